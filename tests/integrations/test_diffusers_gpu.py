"""GPU-only checks of the diffusers adapters: on CUDA in bf16 the adapters run the Triton kernels
(``backend="auto"``) and must agree with the PyTorch reference path (``backend="torch"``).

Run on a CUDA machine (``TRITON_INTERPRET=0``): ``python -m pytest -m gpu tests/integrations``.
Not yet run on a GPU.
"""
import copy

import pytest
import torch

from linvision.diffusers import DiffusersAdapter
from tests import tiny_diffusers as tiny
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def cuda_required():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA device; CI deselects them with -m 'not gpu'")


@pytest.mark.parametrize("family,mechanism,options", [
    ("dit", "lit", {}), ("dit", "linfusion", {}), ("unet", "linfusion", {}),
    ("sd3", "lit", {}), ("flux", "clear", {"radius": 3}), ("flux", "clear", {"radius": 2, "pool_factor": 2}),
    ("flux", "linfusion", {}),
])
def test_triton_path_matches_reference_in_bf16(family, mechanism, options):
    pipe = tiny.BUILDERS[family]().to("cuda", torch.bfloat16)
    denoiser = pipe.unet if family == "unet" else pipe.transformer
    twin = copy.deepcopy(denoiser)
    auto = DiffusersAdapter.construct_for(denoiser, mechanism, **options)
    ref = DiffusersAdapter.construct_for(twin, mechanism, backend="torch", **options)
    ref.load_state_dict(auto.state_dict())
    size = (96, 64) if family != "dit" else (64, 64)
    out = tiny.run(pipe, family, *size)
    pipe.register_modules(**{"unet" if family == "unet" else "transformer": twin})
    expected = tiny.run(pipe, family, *size)
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < 3e-2

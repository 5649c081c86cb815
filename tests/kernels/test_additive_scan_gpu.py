"""GPU-only checks of the additive-scan Triton kernels: bf16, vision head sizes (LRPE doubles Dk), long
sequences with many splits, huge keys. Not yet run on a GPU.

Run on a CUDA machine with ``bash benchmarks/gpu_check.sh`` (``TRITON_INTERPRET=0``); CI deselects
them with ``-m "not gpu"``.
"""
import pytest
import torch

from linvision.kernels.additive_recurrence import additive_scan
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # fp32 is tf32-free ("ieee") dots


@pytest.fixture(autouse=True)
def cuda_required():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA device; CI deselects them with -m 'not gpu'")


def inputs(B, N, H, Dk, Dv, dtype, key_scale=1.0):
    q = torch.randn(B, N, H, Dk, device="cuda")
    k = torch.randn(B, N, H, Dk, device="cuda") * key_scale
    v = torch.randn(B, N, H, Dv, device="cuda")
    mod = torch.randn(1, N, H, Dk, device="cuda").requires_grad_(True)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)] + [mod]


def grads_of(backend, tensors, causal):
    q, k, v, mod = tensors
    if backend == "torch":
        q, k, v = q.float(), k.float(), v.float()
    out = additive_scan(q, k, v, k_mod=mod, causal=causal, backend=backend)
    g = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(out.dtype)
    return [out] + list(torch.autograd.grad(out, tensors, g))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dims", [(128, 64), (144, 72), (64, 64)])  # ViT-B/16 + LRPE, DiT-XL + LRPE, no LRPE
def test_triton_matches_reference_on_gpu(causal, dtype, dims):
    tensors = inputs(2, 1000, 3, *dims, dtype)
    ref = grads_of("torch", tensors, causal)
    out = grads_of("triton", tensors, causal)
    errs = [rel_err(o, r) for o, r in zip(out, ref)]
    assert max(errs) < TOL[dtype], errs


def test_long_sequence_many_splits_and_huge_keys():
    tensors = inputs(1, 65536, 2, 64, 64, torch.bfloat16, key_scale=1e3)
    for causal in (False, True):
        out = grads_of("triton", tensors, causal)
        assert all(torch.isfinite(t).all() for t in out)

"""GPU-only checks of gated_scan's Triton kernels: fp32 / fp16 / bf16, vision head sizes, many checkpoint
intervals and Dv tiles, a long sequence. Not yet run on a GPU.

Run on a CUDA machine with ``bash benchmarks/gpu_check.sh`` (``TRITON_INTERPRET=0``); CI deselects
them with ``-m "not gpu"``.
"""
import pytest
import torch

from linvision.kernels import gated_scan
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def cuda_required():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA device; CI deselects them with -m 'not gpu'")


def inputs(B, N, H, Dk, Dv, dtype, per_channel, delta):
    gen = torch.Generator("cuda").manual_seed(0)
    q, k = (torch.randn(B, N, H, Dk, device="cuda", generator=gen) for _ in range(2))
    v = torch.randn(B, N, H, Dv, device="cuda", generator=gen)
    g = torch.nn.functional.logsigmoid(torch.randn(B, N, H, *((Dk,) if per_channel else ()), device="cuda",
                                                   generator=gen) + 3)
    beta = torch.rand(B, N, H, device="cuda", generator=gen) if delta else None
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v, g)] + ([beta.to(dtype).requires_grad_(True)] if delta else [])


def grads_of(backend, tensors, direction):
    q, k, v, g, *beta = tensors
    if backend == "torch":
        q, k, v, g, *beta = (t.float() for t in tensors)
    out = gated_scan(q, k, v, g, beta[0] if beta else None, direction=direction, delta=bool(beta),
                     qk_l2norm=bool(beta), backend=backend)
    w = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    return [out] + list(torch.autograd.grad((out.float() * w).sum(), tensors))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (48, 96)])
@pytest.mark.parametrize("per_channel,delta", [(False, False), (True, False), (False, True), (True, True)])
def test_triton_matches_reference_on_gpu(dtype, dims, per_channel, delta):
    tensors = inputs(2, 1000, 3, *dims, dtype, per_channel, delta)
    for direction in ("forward", "backward", "bidirectional"):
        ref = grads_of("torch", tensors, direction)
        out = grads_of("triton", tensors, direction)
        errs = [rel_err(o, r) for o, r in zip(out, ref)]
        assert max(errs) < TOL[dtype], (direction, errs)


def test_long_sequence_is_finite():
    tensors = inputs(1, 65536, 2, 64, 64, torch.bfloat16, True, True)
    out = grads_of("triton", tensors, "bidirectional")
    assert all(torch.isfinite(t).all() for t in out)

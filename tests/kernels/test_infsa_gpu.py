"""GPU-only checks of the InfSA Triton kernels: bf16, long sequences, many splits and blocks.

Run on a CUDA machine with ``bash benchmarks/gpu_check.sh`` (``TRITON_INTERPRET=0``); CI deselects
them with ``-m "not gpu"``.
"""
import pytest
import torch

from linvision.kernels.infsa import linear_infsa_pooled, pure_infsa
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
OPS = {"pure": pure_infsa, "pooled": linear_infsa_pooled}


@pytest.fixture(autouse=True)
def cuda_required():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA device; CI deselects them with -m 'not gpu'")


def grads_of(fn, tensors):
    out = fn(*tensors)
    g = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(out.dtype)
    return [out] + list(torch.autograd.grad(out, tensors, g))


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 1000, 3, 64, 64), (1, 4097, 2, 128, 64), (1, 63, 1, 32, 48)])
def test_triton_matches_reference(op, dtype, shape):
    B, N, H, D, Dv = shape
    tensors = [torch.randn(B, N, H, d, device="cuda", dtype=dtype, requires_grad=True) for d in (D, D, Dv)]
    got = grads_of(lambda *t: OPS[op](*t, rho=0.9, backend="triton"), tensors)
    want = grads_of(lambda *t: OPS[op](*(x.double() for x in t), rho=0.9, backend="torch"), tensors)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        assert rel_err(a, b) < TOL[dtype], f"{op} {name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pooled_at_65536_tokens(dtype):
    """fp32 accumulators over 64K tokens: finite, and equal to the fp64 reference."""
    tensors = [torch.randn(1, 65536, 2, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3)]
    got = grads_of(lambda *t: linear_infsa_pooled(*t, backend="triton"), tensors)
    want = grads_of(lambda *t: linear_infsa_pooled(*(x.double() for x in t), backend="torch"), tensors)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and rel_err(a, b) < TOL[dtype]

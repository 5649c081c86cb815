"""GPU-only checks of the Triton linear-attention kernels: bf16, long sequences, split reductions.

Run on a CUDA machine with ``bash benchmarks/gpu_check.sh`` (``TRITON_INTERPRET=0``); CI deselects
them with ``-m "not gpu"``.
"""
import pytest
import torch

from linvision.kernels.linear_attn import linear_attention
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def cuda_required():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA device; CI deselects them with -m 'not gpu'")


def inputs(B, N, H, Dk, Dv, dtype, positive=True):
    make = (lambda *s: torch.rand(*s, device="cuda")) if positive else (lambda *s: torch.randn(*s, device="cuda"))
    q, k = make(B, N, H, Dk), make(B, N, H, Dk)
    v = torch.randn(B, N, H, Dv, device="cuda")
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)]


def grads_of(fn, tensors, seed=0):
    out = fn(*tensors)
    g = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(seed)).to(out.dtype)
    return [out] + list(torch.autograd.grad(out, tensors, g))


def reference(q, k, v, **kw):
    """The PyTorch reference in fp32 on the same (rounded) inputs."""
    return linear_attention(q.float(), k.float(), v.float(), backend="torch", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", [dict(), dict(mean=True, eps=1e-4), dict(normalize="sub", mean=True, scale=0.125),
                                  dict(normalize="none", mean=True), dict(feature_map="elu+1", mean=True)])
@pytest.mark.parametrize("shape", [(2, 1000, 3, 64, 64), (1, 4097, 2, 128, 64), (1, 63, 1, 32, 48)])
def test_triton_matches_reference(dtype, mode, shape):
    B, N, H, Dk, Dv = shape
    tensors = inputs(B, N, H, Dk, Dv, dtype, positive="feature_map" not in mode)
    got = grads_of(lambda *t: linear_attention(*t, backend="triton", **mode), tensors)
    want = grads_of(lambda *t: reference(*t, **mode), tensors)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        assert rel_err(a, b) < TOL[dtype], f"{name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_no_overflow_at_65536_tokens(dtype):
    """fp32 states: large sums over 64K tokens stay finite in half precision, forward and backward."""
    q, k, v = inputs(1, 65536, 2, 64, 64, dtype)
    with torch.no_grad():
        v.mul_(30)  # values near the fp16 range's comfort limit; Σ k v overflows fp16 without fp32 state
    out, dq, dk, dv = grads_of(lambda *t: linear_attention(*t, backend="triton"), [q, k, v])
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert rel_err(out, reference(q, k, v)) < TOL[dtype]


def test_strided_views_of_packed_qkv():
    qkv = torch.rand(2, 777, 3, 4, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    assert rel_err(linear_attention(q, k, v, backend="triton"), reference(q, k, v)) < TOL[torch.bfloat16]

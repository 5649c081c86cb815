"""GPU-only checks of the Triton window-attention (CLEAR) kernels: bf16, FLUX-sized heads, 64K tokens.

Run on a CUDA machine with ``bash benchmarks/gpu_check.sh`` (``TRITON_INTERPRET=0``); CI deselects
them with ``-m "not gpu"``.
"""
import pytest
import torch

from linvision.kernels.window_attn import pool_tokens, window_attention, window_attention_dense
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def cuda_required():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA device; CI deselects them with -m 'not gpu'")


def grads_of(fn, tensors, seed=0):
    out = fn(*tensors)
    g = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(seed)).to(out.dtype)
    return [out] + list(torch.autograd.grad(out, tensors, g))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hw,T,r,f,H,D", [
    ((32, 32), 512, 16, None, 2, 128),  # the spec's validation size: 32×32 tokens + 512 text, dense SDPA oracle
    ((32, 32), 512, 8, 4, 2, 128),  # clear_local_8_down_4 geometry
    ((37, 29), 7, 5, None, 3, 64),  # odd grid, partial tiles everywhere
])
def test_triton_matches_masked_sdpa(dtype, hw, T, r, f, H, D):
    N = T + hw[0] * hw[1]
    q, k, v = (torch.randn(1, N, H, D, device="cuda").to(dtype).requires_grad_(True) for _ in range(3))

    def fn(q, k, v, backend):
        pk = pv = None
        if f:
            pk, pv = pool_tokens(k, hw, f, num_prefix_tokens=T), pool_tokens(v, hw, f, num_prefix_tokens=T)
        if backend == "oracle":
            args = [t.float() if t is not None else None for t in (q, k, v, pk, pv)]
            return window_attention_dense(*args[:3], hw, r, T, args[3], args[4], D**-0.5).to(dtype)
        return window_attention(q, k, v, hw, radius=r, num_prefix_tokens=T, pooled_k=pk, pooled_v=pv, backend=backend)

    got = grads_of(lambda *t: fn(*t, "triton"), [q, k, v])
    want = grads_of(lambda *t: fn(*t, "oracle"), [q, k, v])
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


def test_64k_tokens_bf16_matches_blocked_reference():
    hw, T, r, H, D = (256, 256), 0, 8, 2, 64
    q, k, v = (torch.randn(1, hw[0] * hw[1], H, D, device="cuda", dtype=torch.bfloat16) * 4 for _ in range(3))
    got = window_attention(q, k, v, hw, radius=r, backend="triton")
    want = window_attention(q.float(), k.float(), v.float(), hw, radius=r, backend="torch")
    assert torch.isfinite(got).all() and rel_err(got, want) < 2e-2

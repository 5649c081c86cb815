"""GPU-only checks of the Triton pLSTM scan: compiled kernels (both the tl.dot and the broadcast-sum
paths), bf16, the vision model's sizes. Not yet run on a GPU (no device was available when written).

Run on a CUDA machine with ``bash benchmarks/gpu_check.sh`` (``TRITON_INTERPRET=0``); CI deselects them
with ``-m "not gpu"``.
"""
import pytest
import torch

from linvision.kernels.plstm import plstm2d
from tests.helpers import rel_err

pytestmark = pytest.mark.gpu
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def cuda_required():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need a CUDA device; CI deselects them with -m 'not gpu'")


def case(hw, B, H, Dk, Dv, dtype, O=4):
    N = hw[0] * hw[1]
    dev = "cuda"
    q, k = (torch.randn(B, N, H, Dk, device=dev).to(dtype).requires_grad_(True) for _ in range(2))
    v = torch.randn(B, N, H, Dv, device=dev).to(dtype).requires_grad_(True)
    gates = [torch.rand(B, N, H, O, device=dev).requires_grad_(True) for _ in range(8)]
    d = torch.rand(B, N, H, device=dev).requires_grad_(True)
    return [q, k, v], gates, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hw,chunk", [((14, 14), 8), ((14, 14), 16), ((24, 24), 8), ((7, 9), 4)])
def test_triton_matches_torch_chunked(dtype, hw, chunk):
    qkv, gates, d = case(hw, 2, 3, 64, 64, dtype)
    out = plstm2d(*qkv, *gates, d, hw=hw, chunk_size=chunk, backend="triton")
    ref = plstm2d(*(t.float() for t in qkv), *gates, d, hw=hw, chunk_size=chunk, backend="torch")
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), qkv + gates, g)
    want = torch.autograd.grad(ref, qkv + gates, g)
    for a, b in zip(got, want):
        assert rel_err(a, b) < TOL[dtype]

"""The PyTorch reference (state form, O(N·D²)) against the explicit score-matrix form (O(N·M))."""
import pytest
import torch

from linvision.kernels.linear_attn.naive import linear_attention_naive, linear_attention_quadratic
from tests.helpers import rel_err


@pytest.mark.parametrize("normalize", ["div", "sub", "none"])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("den", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_naive_matches_quadratic(normalize, mean, den, weights):
    B, N, M, H, Dk, Dv, Dd = 2, 7, 9, 3, 4, 5, 6
    d = dict(dtype=torch.float64)
    q, k = torch.rand(B, N, H, Dk, **d) + 0.1, torch.rand(B, M, H, Dk, **d) + 0.1
    v = torch.randn(B, M, H, Dv, **d)
    qd = torch.rand(B, N, H, Dd, **d) + 0.1 if den else None
    kd = torch.rand(B, M, H, Dd, **d) + 0.1 if den else None
    wk = (torch.rand(1, M, H, **d) + 0.5).expand(B, M, H) if weights else None
    wv = torch.rand(B, M, H, **d) + 0.5 if weights else None
    args = (q, k, v, qd, kd, wk, wv, normalize, mean, 1e-6, 1.0 if normalize == "div" else 0.7)
    out = linear_attention_naive(*args)
    ref = linear_attention_quadratic(*args)
    assert out.shape == (B, N, H, Dv) and out.dtype == torch.float64
    assert rel_err(out, ref) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_naive_half_inputs_accumulate_in_fp32(dtype):
    B, N, H, D = 1, 2048, 1, 8
    q, k = (torch.rand(B, N, H, D) + 0.1).to(dtype), (torch.rand(B, N, H, D) + 0.1).to(dtype)
    v = torch.randn(B, N, H, D).to(dtype)
    out = linear_attention_naive(q, k, v, None, None, None, None, "div", False, 1e-6, 1.0)
    ref = linear_attention_quadratic(q.double(), k.double(), v.double(), None, None, None, None, "div", False, 1e-6, 1.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-2

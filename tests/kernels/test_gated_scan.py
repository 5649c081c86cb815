"""gated_scan: step-by-step oracle == chunked reference (values and gradients), the bidirectional sum, the
plain-linear-attention special case, gradcheck, input validation."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linvision.kernels import gated_scan, linear_attention
from tests.helpers import rel_err

GRIDS = [(7, 9), (13, 5)]


def problem(N, per_channel, delta, B=2, H=2, Dk=5, Dv=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, N, H, Dk, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, N, H, Dv, generator=gen, dtype=dtype)
    shape = (B, N, H, Dk) if per_channel else (B, N, H)
    g = torch.nn.functional.logsigmoid(torch.randn(*shape, generator=gen, dtype=torch.float32) + 2).to(dtype)
    beta = torch.rand(B, N, H, generator=gen, dtype=torch.float32).to(dtype) if delta else None
    return q, k, v, g, beta


def run(method, q, k, v, g, beta, direction, **kw):
    return gated_scan(q, k, v, g, beta, direction=direction, delta=beta is not None, qk_l2norm=beta is not None,
                      method=method, **kw)


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
def test_chunked_equals_oracle_fp64(hw, per_channel, delta, direction):
    q, k, v, g, beta = problem(hw[0] * hw[1], per_channel, delta)
    ref = run("naive", q, k, v, g, beta, direction)
    assert ref.dtype == torch.float64 and ref.shape == v.shape
    for chunk in (5, 16):
        assert rel_err(run("chunked", q, k, v, g, beta, direction, chunk_size=chunk), ref) < 1e-10


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("per_channel,delta", [(False, False), (True, True), (False, True)])
def test_forward_and_gradients_in_fp32_and_fp16(hw, dtype, tol, per_channel, delta):
    """The chunked path on fp32 / fp16 inputs against the fp64 oracle on the same (rounded) values."""
    q, k, v, g, beta = (None if t is None else t.to(dtype) for t in problem(hw[0] * hw[1], per_channel, delta, B=1))
    leaves = [t.detach().requires_grad_() for t in (q, k, v, g)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    b64 = None if beta is None else beta.double()
    out = run("chunked", *leaves, beta, "bidirectional")
    ref = run("naive", *leaves64, b64, "bidirectional")
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    w = torch.randn_like(ref)
    (out.float() * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, leaves64):
        assert a.grad.dtype == dtype and rel_err(a.grad, b.grad) < 5 * tol


def test_bidirectional_is_both_causal_scans_minus_the_diagonal():
    q, k, v, g, _ = problem(63, True, False)
    gb = torch.nn.functional.logsigmoid(torch.randn_like(g))
    both = gated_scan(q, k, v, g, direction="bidirectional", g_backward=gb)
    fwd = gated_scan(q, k, v, g, direction="forward")
    bwd = gated_scan(q, k, v, gb, direction="backward")
    diag = (q * k).sum(-1, keepdim=True) * v * q.shape[-1] ** -0.5
    torch.testing.assert_close(both, fwd + bwd - diag)


def test_backward_is_the_forward_scan_of_the_reversed_order():
    q, k, v, g, beta = problem(20, False, True)
    flip = [t.flip(1) for t in (q, k, v, g, beta)]
    torch.testing.assert_close(run("chunked", q, k, v, g, beta, "backward"), run("chunked", *flip, "forward").flip(1))


@pytest.mark.parametrize("chunk", [4, 32])
def test_no_gates_no_delta_is_plain_linear_attention(chunk):
    q, k, v, _, _ = problem(45, False, False, dtype=torch.float32)
    out = gated_scan(q, k, v, direction="bidirectional", scale=0.7, chunk_size=chunk)
    ref = linear_attention(q, k, v, normalize="none", scale=0.7)
    assert rel_err(out, ref) < 1e-6
    zero_g = torch.zeros(q.shape[:3])
    assert rel_err(gated_scan(q, k, v, zero_g, direction="bidirectional", scale=0.7), ref) < 1e-6


def test_hand_computed_delta_step():
    """Two tokens, one head, Dk = Dv = 1, unit keys: S₁ = β₁ v₁; S₂ = α₂(1 − β₂)S₁ + β₂ v₂."""
    q = torch.tensor([1.0, 2.0], dtype=torch.float64).view(1, 2, 1, 1)
    k = torch.ones(1, 2, 1, 1, dtype=torch.float64)
    v = torch.tensor([3.0, 5.0], dtype=torch.float64).view(1, 2, 1, 1)
    g = torch.tensor([0.0, -0.5], dtype=torch.float64).view(1, 2, 1)
    beta = torch.tensor([0.5, 0.25], dtype=torch.float64).view(1, 2, 1)
    s1 = 0.5 * 3.0
    s2 = torch.exp(torch.tensor(-0.5, dtype=torch.float64)) * (1 - 0.25) * s1 + 0.25 * 5.0
    expect = torch.stack([1.0 * s1 * torch.ones((), dtype=torch.float64), 2.0 * s2]).view(1, 2, 1, 1)
    for method in ("naive", "chunked"):
        out = gated_scan(q, k, v, g, beta, delta=True, scale=1.0, method=method)
        torch.testing.assert_close(out, expect)
    neg = gated_scan(q, k, v, g, beta, delta=True, allow_neg_eigval=True, scale=1.0)
    torch.testing.assert_close(neg, gated_scan(q, k, v, g, 2 * beta, delta=True, scale=1.0))


@pytest.mark.parametrize("method", ["naive", "chunked"])
@pytest.mark.parametrize("per_channel,delta", [(False, False), (True, True)])
def test_gradcheck_float64(method, per_channel, delta):
    q, k, v, g, beta = problem(6, per_channel, delta, B=1, H=1, Dk=3, Dv=2)
    args = [t.requires_grad_() for t in (q, k, v, g)] + ([beta.requires_grad_()] if delta else [])

    def f(q, k, v, g, *b):
        return run(method, q, k, v, g, b[0] if b else None, "bidirectional", chunk_size=3)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


@pytest.mark.parametrize("method", ["naive", "chunked"])
@pytest.mark.parametrize("per_channel,delta", [(False, False), (True, True)])
def test_empty_batch(method, per_channel, delta):
    q, k, v, g, beta = problem(7, per_channel, delta, B=0, dtype=torch.float32)
    q.requires_grad_()
    out = run(method, q, k, v, g, beta, "bidirectional", chunk_size=4)
    assert out.shape == (0, 7, 2, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_bad_inputs_raise_value_errors():
    q, k, v, g, beta = problem(10, False, True)
    with pytest.raises(ValueError, match="direction"):
        gated_scan(q, k, v, g, direction="sideways")
    with pytest.raises(ValueError, match="needs beta"):
        gated_scan(q, k, v, g, delta=True)
    with pytest.raises(ValueError, match="delta=True"):
        gated_scan(q, k, v, g, beta)
    with pytest.raises(ValueError, match="beta must be"):
        gated_scan(q, k, v, g, beta[:, :5], delta=True)
    with pytest.raises(ValueError, match="g must be"):
        gated_scan(q, k, v, g[:, :, :1])
    with pytest.raises(ValueError, match="g_backward"):
        gated_scan(q, k, v, g, g_backward=g)
    with pytest.raises(ValueError, match="allow_neg_eigval"):
        gated_scan(q, k, v, g, allow_neg_eigval=True)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_scan(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        gated_scan(q, k, v, g, backend="cuda")
    with pytest.raises(ValueError, match="fp64"):
        gated_scan(q, k, v, g, backend="triton")
    with pytest.raises(ValueError, match="scale"):
        gated_scan(q, k, v, g, scale=-1.0)


FLA = Path(__file__).resolve().parents[1] / "fixtures" / "fla_naive"


@pytest.mark.parametrize("case,delta", [("gla", False), ("delta_rule", True), ("gated_delta_rule", True), ("kda", True)])
@pytest.mark.parametrize("method", ["naive", "chunked"])
def test_matches_fla_naive_reference(case, delta, method):
    """The forward scan is fla's recurrence (GLA, DeltaNet, Gated DeltaNet, KDA) to 1e-5."""
    t = load_file(str(FLA / f"{case}.safetensors"))
    out = gated_scan(t["q"], t["k"], t["v"], t.get("g"), t.get("beta"), delta=delta, method=method)
    assert rel_err(out, t["o"]) < 1e-5

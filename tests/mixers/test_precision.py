"""Numerics of every mixer: fp16/bf16 at input scale 100 stay finite forward and backward; fp64 is fp64
end to end (``gradcheck`` passes, which a hidden fp32 step would break)."""
import pytest
import torch
from torch.autograd import gradcheck

import linvision

MIXERS = linvision.list_mixers()

# gradcheck compares with finite differences, so the forward must be smooth in x: DyDiLA's default
# straight-through router gradient is by design not the derivative of its hard (argmax) forward.
GRADCHECK_OPTIONS = {"dydila": dict(router_grad="none")}


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("dtype,scale", [(torch.float16, 100), (torch.bfloat16, 100), (torch.float16, 1000)])
def test_half_precision_at_large_input_scale_is_finite(name, dtype, scale):
    """Pre-norm sums of large inputs exceed fp16's range; they must stay fp32 up to and through the norm.
    On a 16×16 grid LightNet's fp16 scan output overflowed from scale 300 (at 100 only on larger grids,
    e.g. 1,088 infs on 128×128), pLSTM's already at 100."""
    torch.manual_seed(0)
    m = linvision.create_mixer(name, 32, 2).to(dtype)
    x = (torch.randn(1, 1 + 16 * 16, 32) * scale).to(dtype).requires_grad_()
    y = m(x, (16, 16), num_prefix_tokens=1)
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), f"{name}: {int((~torch.isfinite(y)).sum())} non-finite outputs"
    y.float().square().mean().backward()
    assert torch.isfinite(x.grad).all(), f"{name}: non-finite input gradient"
    overflowed = {n: p.grad for n, p in m.named_parameters() if p.grad is not None and not p.grad.isfinite().all()}
    if overflowed:
        # A parameter's gradient is stored in the parameter's dtype: it may overflow only where its true
        # value (fp32) is itself beyond that range (at scale 1000 gated_delta's gate weights get ~1e6).
        ref = m.float()
        ref.zero_grad()
        ref(x.detach().float(), (16, 16), num_prefix_tokens=1).square().mean().backward()
        grads = dict(ref.named_parameters())
        for pname, g in overflowed.items():
            true = grads[pname].grad[~g.isfinite()]
            assert (true.abs() > torch.finfo(dtype).max / 2).all(), f"{name}: non-finite gradient of {pname}"


@pytest.mark.parametrize("name", MIXERS)
def test_float64_gradcheck(name):
    torch.manual_seed(0)
    m = linvision.create_mixer(name, 8, 2, **GRADCHECK_OPTIONS.get(name, {})).double()
    x = torch.randn(1, 1 + 3 * 4, 8, dtype=torch.float64, requires_grad=True)
    assert m(x, (3, 4), 1).dtype == torch.float64
    assert gradcheck(lambda t: m(t, (3, 4), 1), (x,), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_float64_gradcheck_of_infsa_rho():
    """ρ = sigmoid(rho_logit) in fp64 for an fp64 module (it was computed in fp32)."""
    torch.manual_seed(0)
    m = linvision.create_mixer("infsa", 8, 2, rho_learnable=True).double()
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    logit = m.rho_logit.detach().clone().requires_grad_()

    def f(t):
        return torch.func.functional_call(m, {"rho_logit": t}, (x, (3, 4)))

    assert gradcheck(f, (logit,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", MIXERS)
def test_empty_batch(name):
    m = linvision.create_mixer(name, 32, 4)
    x = torch.randn(0, 1 + 6 * 5, 32, requires_grad=True)
    y = m(x, (6, 5), num_prefix_tokens=1)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def reached(name, m, hw, num_prefix_tokens, row, col):
    """Bool ``[N]``: the tokens one non-finite image token at ``(row, col)`` reaches. Every token, except in
    the block-local ``transnormer_diag``: there only its own tile and the prefix tokens (which see every token)."""
    if name != "transnormer_diag":
        return torch.ones(num_prefix_tokens + hw[0] * hw[1], dtype=torch.bool)
    bh, bw = m.block_size
    rows, cols = torch.arange(hw[0]) // bh == row // bh, torch.arange(hw[1]) // bw == col // bw
    return torch.cat([torch.ones(num_prefix_tokens, dtype=torch.bool), (rows[:, None] & cols).flatten()])


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_one_non_finite_token_reaches_its_whole_sample(name, bad):
    """The README's warning: mixing is global, so one NaN/inf token poisons every output of its sample
    (and only of its sample); in a block-local mixer exactly its tile and the prefix tokens."""
    torch.manual_seed(0)
    m = linvision.create_mixer(name, 32, 2)
    x = torch.randn(2, 1 + 7 * 9, 32)
    x[0, 1 + 3 * 9 + 4, 5] = bad
    with torch.no_grad():
        y = m(x, (7, 9), num_prefix_tokens=1)
    assert torch.equal(~torch.isfinite(y[0]).all(-1), reached(name, m, (7, 9), 1, 3, 4))
    assert torch.isfinite(y[1]).all()

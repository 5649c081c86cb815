"""gated_scan's ``initial_state`` / ``output_final_state``: oracle == chunked with states, a sequence split in
two with the state carried equals one call (both directions), gradients through the state, refusals."""
import pytest
import torch
import torch.nn.functional as F

from linvision.kernels import gated_scan
from tests.helpers import rel_err


def problem(N, per_channel, delta, n=1, B=2, H=2, Dk=5, Dv=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, Dk, generator=gen, dtype=dtype)
    k = torch.randn(B, N * n, H, Dk, generator=gen, dtype=dtype)
    v = torch.randn(B, N * n, H, Dv, generator=gen, dtype=dtype)
    g = F.logsigmoid(torch.randn(*((B, N, H, Dk) if per_channel else (B, N, H)), generator=gen, dtype=dtype) + 2)
    beta = torch.rand(B, N * n, H, generator=gen, dtype=dtype) if delta else None
    s0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=dtype)
    return q, k, v, g, beta, s0


def run(q, k, v, g, beta, n=1, **kw):
    return gated_scan(q, k, v, g, beta, delta=beta is not None, qk_l2norm=beta is not None, num_householder=n,
                      output_final_state=True, **kw)


CASES = [(False, False, 1), (True, False, 1), (False, True, 1), (True, True, 1), (True, True, 2)]


@pytest.mark.parametrize("per_channel,delta,n", CASES)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_chunked_equals_oracle_with_states(per_channel, delta, n, direction):
    q, k, v, g, beta, s0 = problem(63, per_channel, delta, n)
    ref, ref_state = run(q, k, v, g, beta, n, direction=direction, method="naive", initial_state=s0)
    assert ref_state.dtype == torch.float64 and ref_state.shape == s0.shape
    for chunk in (5, 16):
        out, state = run(q, k, v, g, beta, n, direction=direction, chunk_size=chunk, initial_state=s0)
        assert rel_err(out, ref) < 1e-10 and rel_err(state, ref_state) < 1e-10


def test_zero_initial_state_is_no_initial_state_and_the_state_is_fp32():
    q, k, v, g, beta, s0 = (t.float() for t in problem(20, True, True))
    out, state = run(q, k, v, g, beta, initial_state=torch.zeros_like(s0))
    assert state.dtype == torch.float32
    assert torch.equal(out, gated_scan(q, k, v, g, beta, delta=True, qk_l2norm=True))
    assert torch.equal(out, run(q, k, v, g, beta)[0])
    half = run(q.half(), k.half(), v.half(), g.half(), beta.half(), initial_state=s0.half())
    assert half[0].dtype == torch.float16 and half[1].dtype == torch.float32


@pytest.mark.parametrize("per_channel,delta,n", CASES)
@pytest.mark.parametrize("method", ["naive", "chunked"])
def test_split_in_two_with_the_state_carried_equals_one_call(per_channel, delta, n, method):
    q, k, v, g, beta, s0 = problem(45, per_channel, delta, n)
    cut = 17

    def part(t, a, b, rows=1):
        return None if t is None else t[:, a * rows:b * rows]

    def half(a, b, state, direction):
        return run(part(q, a, b), part(k, a, b, n), part(v, a, b, n), part(g, a, b), part(beta, a, b, n), n,
                   direction=direction, method=method, chunk_size=8, initial_state=state)

    full, full_state = run(q, k, v, g, beta, n, method=method, chunk_size=8, initial_state=s0)
    o1, s1 = half(0, cut, s0, "forward")
    o2, s2 = half(cut, 45, s1, "forward")
    assert rel_err(torch.cat([o1, o2], 1), full) < 1e-12 and rel_err(s2, full_state) < 1e-12
    full, full_state = run(q, k, v, g, beta, n, direction="backward", method=method, chunk_size=8, initial_state=s0)
    o2, s2 = half(cut, 45, s0, "backward")  # the backward scan starts at the end
    o1, s1 = half(0, cut, s2, "backward")
    assert rel_err(torch.cat([o1, o2], 1), full) < 1e-12 and rel_err(s1, full_state) < 1e-12


@pytest.mark.parametrize("method", ["naive", "chunked"])
@pytest.mark.parametrize("per_channel,delta,n", [(False, False, 1), (True, True, 2)])
def test_gradcheck_through_the_states(method, per_channel, delta, n):
    q, k, v, g, beta, s0 = problem(5, per_channel, delta, n, B=1, H=1, Dk=3, Dv=2)
    args = [t.requires_grad_() for t in (q, k, v, g, s0)] + ([beta.requires_grad_()] if delta else [])

    def f(q, k, v, g, s0, *b):
        out, state = run(q, k, v, g, b[0] if b else None, n, direction="backward", method=method, chunk_size=2,
                         initial_state=s0)
        return out, state

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_state_gradients_chunked_equal_oracle_fp32():
    q, k, v, g, beta, s0 = (t.float() for t in problem(63, True, True))
    grads = []
    for method in ("naive", "chunked"):
        s = s0.clone().requires_grad_()
        out, state = run(q, k, v, g, beta, method=method, initial_state=s)
        (out.square().sum() + state.square().sum()).backward()
        grads.append(s.grad)
    assert rel_err(grads[1], grads[0]) < 1e-5


def test_bad_state_arguments():
    q, k, v, g, beta, s0 = problem(6, False, True)
    with pytest.raises(ValueError, match="bidirectional"):
        gated_scan(q, k, v, g, beta, delta=True, direction="bidirectional", initial_state=s0)
    with pytest.raises(ValueError, match="bidirectional"):
        gated_scan(q, k, v, g, beta, delta=True, direction="bidirectional", output_final_state=True)
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_scan(q, k, v, g, beta, delta=True, initial_state=s0[:, :1])
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_scan(q, k, v, g, beta, delta=True, initial_state=s0.long())
    with pytest.raises(ValueError, match="output_final_state"):
        gated_scan(q, k, v, g, beta, delta=True, output_final_state=1)

"""gated_scan's chunked path over many groups: reverse scans walk the groups backwards, the outputs go to
their tokens (in place without autograd, concatenated with it), partial last groups; against the oracle."""
import pytest
import torch

from linvision.kernels import gated_scan
from linvision.kernels.gated_recurrence import chunked
from tests.helpers import rel_err
from tests.kernels.test_gated_scan import problem


@pytest.fixture
def small_groups(monkeypatch):
    """Groups of one or two chunks, so N = 63 spans many groups with a partial last one."""
    monkeypatch.setattr(chunked, "GROUP_ELEMENTS", 1)


def scan(method, q, k, v, g, beta, direction, **kw):
    return gated_scan(q, k, v, g, beta, direction=direction, delta=beta is not None, qk_l2norm=beta is not None,
                      method=method, **kw)


@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
@pytest.mark.parametrize("per_channel,delta", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("chunk", [5, 16])
def test_many_groups_equal_the_oracle(small_groups, direction, per_channel, delta, chunk):
    q, k, v, g, beta = problem(63, per_channel, delta)
    ref = scan("naive", q, k, v, g, beta, direction)
    with torch.no_grad():
        out = scan("chunked", q, k, v, g, beta, direction, chunk_size=chunk)
    assert rel_err(out, ref) < 1e-10


@pytest.mark.parametrize("direction", ["backward", "bidirectional"])
def test_gradients_over_many_groups(small_groups, direction):
    """With autograd recording the outputs are concatenated: values equal the in-place path, gradients the oracle's."""
    q, k, v, g, beta = problem(37, True, True)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, g, beta)]
    oracle = [t.detach().requires_grad_() for t in (q, k, v, g, beta)]
    out = scan("chunked", *leaves, direction, chunk_size=4)
    ref = scan("naive", *oracle, direction)
    with torch.no_grad():
        assert torch.equal(scan("chunked", q, k, v, g, beta, direction, chunk_size=4), out)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, oracle):
        assert rel_err(a.grad, b.grad) < 1e-10


def test_final_state_of_a_reverse_scan_over_many_groups(small_groups):
    q, k, v, g, beta = problem(29, False, True)
    out, state = gated_scan(q, k, v, g, beta, delta=True, direction="backward", chunk_size=3, output_final_state=True)
    ref, ref_state = gated_scan(q, k, v, g, beta, delta=True, direction="backward", method="naive",
                                output_final_state=True)
    assert rel_err(out, ref) < 1e-10 and rel_err(state, ref_state) < 1e-10


def test_the_output_is_written_everywhere(small_groups):
    """fp32 inputs without autograd: every token of the one output is written (the test run poisons empty)."""
    q, k, v, g, _ = (None if t is None else t.float() for t in problem(41, True, False))
    with torch.no_grad():
        out = gated_scan(q, k, v, g, direction="bidirectional", chunk_size=8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("method", ["chunked", "naive"])
@pytest.mark.parametrize("direction", ["forward", "backward", "bidirectional"])
def test_add_to_adds_in_place_without_autograd_and_differentiably_with_it(small_groups, method, direction):
    """``add_to``: the scan's output added to a given tensor: in place (the same tensor back) without autograd,
    a sum with both gradients with it; a wrong shape is refused."""
    q, k, v, g, beta = problem(37, False, True)
    base = torch.randn(*q.shape[:3], v.shape[-1], dtype=q.dtype)
    want = base + scan("naive", q, k, v, g, beta, direction)
    with torch.no_grad():
        target = base.clone()
        got = scan(method, q, k, v, g, beta, direction, chunk_size=4, add_to=target)
    assert got is target and rel_err(got, want) < 1e-10
    leaves = [t.detach().requires_grad_() for t in (q, k, v, g, beta, base)]
    got = scan(method, *leaves[:5], direction, chunk_size=4, add_to=leaves[5])
    oracle = [t.detach().requires_grad_() for t in (q, k, v, g, beta, base)]
    want = oracle[5] + scan("naive", *oracle[:5], direction)
    assert rel_err(got, want) < 1e-10
    probe = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, leaves, probe), torch.autograd.grad(want, oracle, probe)):
        assert rel_err(a, b) < 1e-9
    with pytest.raises(ValueError, match="add_to must be"):
        scan(method, q, k, v, g, beta, direction, add_to=base[:, 1:])
    narrow = base.float().requires_grad_()  # the result keeps add_to's dtype, with autograd and without
    assert scan(method, *leaves[:5], direction, chunk_size=4, add_to=narrow).dtype == torch.float32
    with torch.no_grad():
        assert scan(method, q, k, v, g, beta, direction, chunk_size=4, add_to=base.float()).dtype == torch.float32


@pytest.mark.parametrize("delta", [False, True])
def test_pairwise_buffers_serve_groups_of_several_chunks_and_a_shorter_last_one(monkeypatch, delta):
    """Without autograd the per-channel pairwise decays of every group go into two buffers sized for a whole group:
    groups of three chunks and a last one of one (partial) chunk give the autograd path's values exactly."""
    q, k, v, g, beta = problem(2 * 3 * 4 + 3, True, delta)  # chunks of 4: groups of 12, 12 and 3 tokens
    B, _, H, K = q.shape
    monkeypatch.setattr(chunked, "GROUP_ELEMENTS", 3 * B * H * 4 * (4 * K + 2 * K + v.shape[-1]))
    with torch.no_grad():
        out = scan("chunked", q, k, v, g, beta, "forward", chunk_size=4)
    with torch.enable_grad():
        recorded = scan("chunked", q.requires_grad_(), k, v, g, beta, "forward", chunk_size=4)
    assert torch.equal(out, recorded)
    assert rel_err(out, scan("naive", q, k, v, g, beta, "forward")) < 1e-10

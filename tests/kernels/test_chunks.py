"""Stacking per-range results along the tokens (``stack_ranges``, ``stack_chunks``)."""
import pytest
import torch

from linvision.kernels.chunks import stack_chunks, stack_ranges


def test_stack_ranges_writes_each_range_once_in_any_order():
    x = torch.randn(2, 11, 3)
    calls = []
    out = stack_ranges(lambda a, b: (calls.append((a, b)), x[:, a:b] * 2)[1], [(4, 11), (0, 1), (1, 4)], 11)
    assert calls == [(4, 11), (0, 1), (1, 4)] and torch.equal(out, x * 2)
    assert stack_ranges(lambda a, b: x[:, a:b], [(0, 11)], 11) is not None  # one range: fn's own result
    whole = x * 3
    assert stack_ranges(lambda a, b: whole, [(0, 11)], 11) is whole


@pytest.mark.parametrize("step", [1, 4, 11, 20])
def test_stack_chunks_is_stack_ranges_of_equal_steps(step):
    x = torch.randn(2, 11, 3, requires_grad=True)
    out = stack_chunks(lambda a, b: x[:, a:b].exp(), 11, step)
    assert torch.equal(out, x.exp())
    out.sum().backward()  # through the in-place writes
    assert torch.allclose(x.grad, x.exp())


@pytest.mark.parametrize("num_tokens,step,lag", [(23, 4, 0), (23, 4, 5), (23, 4, 9), (8, 3, 100), (5, 8, 2)])
def test_stack_chunks_into_a_buffer_the_chunks_read(num_tokens, step, lag):
    """Each chunk reads the buffer from ``lag`` tokens before its range to the end (as a convolution's halo would)
    and must see the original values: the results equal those computed from an untouched copy."""
    from linvision.kernels.chunks import stack_chunks_into

    torch.manual_seed(0)
    buf = torch.randn(2, num_tokens, 3)
    original = buf.clone()

    def fn_of(src):
        return lambda a, b: src[:, max(a - lag, 0):].sum(1, keepdim=True).expand(-1, b - a, -1) + src[:, a:b]

    want = stack_chunks(fn_of(original), num_tokens, step)
    got = stack_chunks_into(fn_of(buf), num_tokens, step, buf, lag)
    assert got is buf and torch.equal(got, want)

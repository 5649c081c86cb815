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

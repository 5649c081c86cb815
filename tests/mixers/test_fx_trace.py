"""``torch.fx.symbolic_trace`` of a bare mixer: every registered mixer either traces (output equal to eager) or
raises :class:`MixerTraceError` naming why and the routes that work, and the leaf-module route works for all."""
import pytest
import torch
import torch.fx

import linvision
from linvision.mixers import MixerTraceError, TokenMixer, symbolic_trace_at
from linvision.mixers.tracing import AtGrid
from tests.helpers import one_thread, rel_err  # noqa: F401  (one_thread: autouse fixture)

MIXERS = linvision.list_mixers()
DIM, HEADS, HW = 16, 2, (7, 9)
# Decided per mixer: these trace symbolically. Every other mixer picks its accumulation dtype, kernel backend or
# chunking from x's dtype, device or shape (linvision_kernels/backend.py::accumulation_dtype, the kernels' validation and
# dispatch), which a symbolic Proxy does not carry.
TRACEABLE = {"softmax"}


class LeafTracer(torch.fx.Tracer):
    """The route the error names for a plain torch.fx user: mixers as leaf modules."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, TokenMixer) or super().is_leaf_module(m, qualname)


def make(name):
    torch.manual_seed(0)
    return linvision.create_mixer(name, dim=DIM, num_heads=HEADS).eval()


def tokens(prefix=0):
    return torch.randn(2, HW[0] * HW[1] + prefix, DIM, generator=torch.Generator().manual_seed(1))


def test_the_decision_covers_registered_mixers():
    assert TRACEABLE <= set(MIXERS)


@pytest.mark.parametrize("name", MIXERS)
def test_symbolic_trace_works_or_says_why(name):
    m = make(name)
    x = tokens()
    if name in TRACEABLE:
        traced = torch.fx.symbolic_trace(m, concrete_args={"hw": HW})
        assert any(n.op == "call_function" for n in traced.graph.nodes)  # a real graph, not one opaque call
        assert rel_err(traced(x, HW, 0), m(x, HW)) <= 1e-6
        at = symbolic_trace_at(m, HW, num_prefix_tokens=2)
        x2 = tokens(prefix=2)
        assert rel_err(at(x2), m(x2, HW, 2)) <= 1e-6
        with pytest.raises(AssertionError, match="token count"):
            at(x)  # the traced grid is checked as the eager mixer checks it
        return
    cls = type(m).__name__
    for trace in (lambda: torch.fx.symbolic_trace(m, concrete_args={"hw": HW}), lambda: symbolic_trace_at(m, HW)):
        with pytest.raises(MixerTraceError, match=rf"cannot trace {cls} on its own: .*at \S+\.py:\d+: .*"
                                                  rf"leaf module.*torch\.export\.export"):
            trace()


@pytest.mark.parametrize("name", MIXERS)
def test_leaf_module_route(name):
    m = make(name)
    graph = LeafTracer().trace(AtGrid(m, HW))
    traced = torch.fx.GraphModule(AtGrid(m, HW), graph)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["mixer"]
    x = tokens()
    assert rel_err(traced(x), m(x, HW)) <= 1e-6


def test_hw_must_be_concrete():
    with pytest.raises(MixerTraceError, match=r"hw sets the token grid and must be concrete.*concrete_args"):
        torch.fx.symbolic_trace(make("softmax"))
    with pytest.raises(ValueError, match="hw must be a pair"):
        symbolic_trace_at(make("softmax"), (7,))


def test_export_route_named_in_the_error():
    m = make("nala")
    x = tokens()
    program = torch.export.export(m, (x,), {"hw": HW})
    assert rel_err(program.module()(x, hw=HW), m(x, HW)) <= 1e-6

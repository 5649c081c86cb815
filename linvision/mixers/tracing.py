"""``torch.fx.symbolic_trace`` of a bare mixer: traced at a concrete ``hw``, or a clear error saying why not.

``torch.fx.symbolic_trace(mixer, concrete_args={"hw": (h, w)})`` calls ``mixer.forward`` with a symbolic
``x`` (a ``torch.fx.Proxy``: no dtype, device or shape). :func:`trace_mix` is what ``TokenMixer.forward``
does then: it checks ``hw`` and ``num_prefix_tokens`` (concrete values; a symbolic ``num_prefix_tokens``, the
default when it is not in ``concrete_args``, passes through), records the input checks as ``torch._assert``
nodes (so the graph refuses another rank, channel count or token count, as the eager mixer does), and
traces :meth:`TokenMixer.mix`.

Most mechanisms choose their accumulation dtype (fp64 for fp64 inputs, else fp32), their kernel backend
(Triton for CUDA tensors) or their chunking from the input's dtype, device and shape; a Proxy carries none of
these, so their ``mix`` cannot be traced symbolically. For those, :class:`MixerTraceError` names the mixer,
the first line of its code that needed a concrete value, and the routes that work: the mixer as a leaf
module (timm's FX feature extraction does this, see :mod:`linvision.models.block`), or capture with real
example inputs (``torch.export.export``), which sees dtype, device and shape.
"""
from __future__ import annotations

import traceback
from pathlib import Path
from typing import Tuple, Union

import torch
from torch import nn
from torch.fx import Proxy
from torch.fx.proxy import TraceError

from ..kernels.validation import check_hw, check_int

_REPO = Path(__file__).resolve().parents[2]
_TORCH = str(Path(torch.__file__).resolve().parent)


class MixerTraceError(TraceError):
    """``torch.fx.symbolic_trace`` cannot trace this mixer on its own (a ``TraceError``, hence a ``ValueError``)."""


def routes(mixer: nn.Module) -> str:
    """The supported ways to put ``mixer`` in a graph, for the error messages."""
    return (f"Keep {type(mixer).__name__} a leaf module (timm's create_feature_extractor / get_graph_node_names do: "
            "linvision registers every TokenMixer with timm's FX helpers; with a plain torch.fx.Tracer, return True "
            "from is_leaf_module for linvision.mixers.TokenMixer), or capture it with an example input: "
            "torch.export.export(mixer, (x,), {'hw': (h, w)}).")


def _where(err: BaseException) -> str:
    """``path:line: code`` of the deepest frame of ``err`` outside torch (the mixer's line that needed a value)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not str(Path(f.filename).resolve()).startswith(_TORCH)]
    if not frames:
        return "inside torch.fx"
    frame = frames[-1]
    path = Path(frame.filename).resolve()
    name = path.relative_to(_REPO) if path.is_relative_to(_REPO) else path
    return f"{name}:{frame.lineno}: {(frame.line or '').strip()}"


def trace_mix(mixer: nn.Module, x: Proxy, hw: Tuple[int, int], num_prefix_tokens: Union[int, Proxy]) -> Proxy:
    """``mixer.mix(x, hw, num_prefix_tokens)`` on a symbolic ``x (B, N, C)``; ``MixerTraceError`` if it cannot be traced."""
    if isinstance(hw, Proxy):
        raise MixerTraceError(f"torch.fx.symbolic_trace of {type(mixer).__name__}: hw sets the token grid and must be "
                              "concrete; trace with concrete_args={'hw': (h, w)} or linvision.mixers.symbolic_trace_at(mixer, hw)")
    h, w = check_hw(hw)
    prefix = num_prefix_tokens if isinstance(num_prefix_tokens, Proxy) else check_int(
        "num_prefix_tokens", num_prefix_tokens, min=0)
    dim = mixer.dim
    torch._assert(x.dim() == 3, "expected x of shape (B, N, C)")
    torch._assert(x.size(-1) == dim, f"expected {dim} channels")
    if isinstance(prefix, Proxy):  # torch.fx's codegen resets a defaulted argument beside a tuple concrete arg
        torch._assert(x.size(1) >= h * w, f"token count below the traced hw={h}x{w}")
    else:
        torch._assert(x.size(1) == h * w + prefix, f"token count is not the traced hw={h}x{w} plus {prefix} prefix tokens")
    try:
        return mixer.mix(x, (h, w), prefix)
    except MixerTraceError:
        raise
    except Exception as err:  # any failure while x is symbolic is a tracing limit (the inputs were checked above)
        raise MixerTraceError(
            f"torch.fx.symbolic_trace cannot trace {type(mixer).__name__} on its own: its forward needs a concrete "
            f"dtype, device or shape of x, which a symbolic Proxy does not carry ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''} at {_where(err)}). {routes(mixer)}") from err


class AtGrid(nn.Module):
    """``mixer`` with ``hw`` and ``num_prefix_tokens`` fixed: ``forward(x (B, N, C)) → (B, N, C)``."""

    def __init__(self, mixer: nn.Module, hw: Tuple[int, int], num_prefix_tokens: int = 0):
        super().__init__()
        self.mixer = mixer
        self.hw = check_hw(hw)
        self.num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, min=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(x, self.hw, self.num_prefix_tokens)


def symbolic_trace_at(mixer: nn.Module, hw: Tuple[int, int], num_prefix_tokens: int = 0) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` of ``mixer`` at a fixed grid: a GraphModule with ``forward(x)``.

    The same graph as ``torch.fx.symbolic_trace(mixer, concrete_args={"hw": hw})``, without torch.fx's
    codegen for tuple ``concrete_args`` (whose generated ``forward`` resets ``num_prefix_tokens`` to its
    default, and does not compile when it is given too). ``MixerTraceError`` for a mixer that cannot be traced.
    """
    return torch.fx.symbolic_trace(AtGrid(mixer, hw, num_prefix_tokens))


__all__ = ["AtGrid", "MixerTraceError", "routes", "symbolic_trace_at", "trace_mix"]

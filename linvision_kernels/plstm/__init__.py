"""pLSTM: source / transition / mark state passing over a 2-D grid, a chain, or a DAG.

Paper: Pöppel et al., "pLSTM: parallelizable Linear Source Transition Mark networks", arXiv 2506.11997.
Official code: ``ml-jku/plstm`` at ``a404ff3`` (``src/plstm/torch/plstm_2d.py``, ``plstm_2d_fused.py``,
``plstm_1d.py``, ``plstm_graph.py``). Only scalar gates (all state-tracking dimensions ``J = 1``, as in
every shipped config) are supported.

Layout: q, k ``[B, N, H, Dk]``, v ``[B, N, H, Dv]``, gates ``[B, N, H]`` or ``[B, N, H, O]``; a grid of
``hw = (X, Y)`` has ``N = X·Y`` nodes in raster order (``x`` slow = image rows, the official dim 1).

Implementations of :func:`plstm2d` (all give the same numbers; tests hold them to 1e-6 in fp64):

- ``method="naive"``: node-by-node loop (:mod:`.naive`), the oracle.
- ``method="full"``: the official vision form: log-doubling over one cell padded to a square power of
  two, full ``N × N`` gating matrix (:func:`gating_matrix_2d`). Quadratic in N.
- ``method="chunked"`` (default): ``chunk_size²``-node chunks, quadratic inside, border states passed
  along a wavefront across chunks; linear in N. Without autograd it runs strip by strip of chunk rows
  (:mod:`.by_strip`), with it as whole frames (:func:`.chunked.plstm2d_chunked`). ``backend="triton"`` runs its scan in Triton, forward
  and backward kernels (:mod:`.triton`); the chunk matrices come from the PyTorch doubling.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..validation import (
    check_choice,
    check_float,
    check_floating_dtype,
    check_hw,
    check_int,
    check_optional,
    check_qkv,
    check_triton_dtype,
)
from .by_strip import plstm2d_by_strip
from .chunked import gating_matrix_2d as _gating_matrix_2d
from .chunked import plstm2d_chunked, plstm2d_full_g
from .naive import (
    ORIENTATION_FLIPS,
    check_topological,
    grid_dag,
    grid_gates_to_dag,
    line_graph_pairs,
    plstm1d_naive,
    plstm2d_naive,
    plstm_dag_naive,
)

METHODS = ("naive", "full", "chunked")
DEFAULT_CHUNK = {"torch": 4, "triton": 16}  # CPU: inter-chunk work grows with C (C·Dk·Dv per node); Triton: C >= 16 puts every product on tl.dot
GATE_NAMES = ("s_r", "s_d", "t_rl", "t_du", "t_dl", "t_ru", "m_l", "m_u")


@torch.compiler.disable  # runs eagerly inside a compiled model: its per-diagonal Python loops would be unrolled
def plstm2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    s_r: Tensor,
    s_d: Tensor,
    t_rl: Tensor,
    t_du: Tensor,
    t_dl: Optional[Tensor],
    t_ru: Optional[Tensor],
    m_l: Tensor,
    m_u: Tensor,
    d: Optional[Tensor] = None,
    *,
    hw: Tuple[int, int],
    scale: Optional[float] = None,
    method: str = "chunked",
    chunk_size: Optional[int] = None,
    out_dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> Tensor:
    """2-D pLSTM over an ``X × Y`` grid, one or four orientations summed, plus the direct term.

    Per orientation (``C^r`` leaves a node towards ``x + 1``, ``C^d`` towards ``y + 1``; gates at node x,y)::

        C^r[x,y] = T^rl C^r[x-1,y] + T^ru C^d[x,y-1] + S^r k vᵀ
        C^d[x,y] = T^du C^d[x,y-1] + T^dl C^r[x-1,y] + S^d k vᵀ
        h[x,y]   = s·qᵀ (M^l C^r[x-1,y] + M^u C^d[x,y-1])

    ``out = Σ_o flip_o(h_o) + d·s·(q·k)·v`` with ``s = scale`` (default ``Dk^-1/2``). Gates ``[B, N, H]``
    (one orientation) or ``[B, N, H, O]``, ``O`` ∈ {1, 4}: orientation o runs on the grid flipped by
    ``ORIENTATION_FLIPS[o]`` = identity, flip x, flip y, flip both (``pLSTM2D_parallel_fused_torch``).
    ``t_dl``/``t_ru`` may be ``None`` (no such edge: D-mode's chirality). ``d``: ``[B, N, H]`` or ``None``.

    Any grid works: the doubling pads internally with zero gates (which never changes a real output).
    ``chunk_size`` (a power of two; ``method="chunked"``): default 4 on the PyTorch path, 16 on Triton.
    States and sums are fp32 (fp64 for fp64 inputs); the output has ``out_dtype``, default the dtype of q
    (``torch.float32`` keeps an fp16 result that a norm follows from overflowing).
    ``backend``: ``"auto"`` (Triton for CUDA tensors with ``method="chunked"``), ``"torch"``, ``"triton"``.

    Under ``torch.compile`` this function is a graph break and runs eagerly (``torch.compiler.disable``):
    traced, its per-anti-diagonal loops and the log-doubling unroll into thousands of graph nodes per
    layer (minutes of compile time for a 12-layer model); the surrounding projections and norms still
    compile. Outputs are the eager ones.
    """
    gates, d, hw, scale = _validated_2d(q, k, v, (s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u), d, hw, scale)
    check_choice("method", method, METHODS)
    chunk_size = check_optional(check_chunk_size, "chunk_size", chunk_size)
    out_dtype = q.dtype if out_dtype is None else check_floating_dtype("out_dtype", out_dtype)
    if backend == "auto" and method != "chunked":
        chosen = "torch"
    else:
        chosen = resolve_backend(backend, q, k, v)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK[chosen]
    if chosen == "triton":
        if method != "chunked":
            raise ValueError(f"backend='triton' implements method='chunked' only, got method={method!r}")
        check_triton_dtype(q)
        from .triton import plstm2d_triton

        out = plstm2d_triton(q, k, v, *gates, d, hw, scale, chunk_size)
    elif method == "naive":
        out = plstm2d_naive(q, k, v, *gates, d, hw, scale)
    elif method == "full":
        out = plstm2d_full_g(q, k, v, *gates, d, hw, scale)
    else:  # without autograd: strip by strip, no temporary sized by the grid (same numbers)
        recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, d, *gates))
        out = (plstm2d_chunked if recording else plstm2d_by_strip)(q, k, v, *gates, d, hw, scale, chunk_size)
    return out.to(out_dtype)


def gating_matrix_2d(
    s_r: Tensor,
    s_d: Tensor,
    t_rl: Tensor,
    t_du: Tensor,
    t_dl: Optional[Tensor],
    t_ru: Optional[Tensor],
    m_l: Tensor,
    m_u: Tensor,
    d: Optional[Tensor] = None,
    *,
    hw: Tuple[int, int],
) -> Tensor:
    """The full gating matrix ``G [B, H, N, N]`` of :func:`plstm2d` (``out = s·Σ_{n'} G[n,n'] (q_n·k_{n'}) v_{n'}``),
    built by log doubling as in the official vision layer; fp32 (fp64 for fp64 gates)."""
    B, N, H = s_r.shape[:3]
    dummy = s_r.new_zeros(B, N, H, 1)
    gates, d, hw, _ = _validated_2d(dummy, dummy, dummy, (s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u), d, hw, 1.0)
    return _gating_matrix_2d(*gates, d, hw)


def plstm1d(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, t: Tensor, m: Tensor, d: Optional[Tensor] = None, *,
    scale: Optional[float] = None, backend: str = "auto",
) -> Tensor:
    """Causal 1-D pLSTM: ``C_n = T_n C_{n-1} + S_n k_n v_nᵀ``, ``h_n = s·q_nᵀ M_n C_{n-1} + d_n s (q_n·k_n) v_n``.

    Gates ``[B, N, H]``. PyTorch reference only (``backend="triton"`` is a ``ValueError``).
    """
    _check_qkv(q, k, v)
    B, N, H = q.shape[:3]
    for name, g in (("s", s), ("t", t), ("m", m)) + ((("d", d),) if d is not None else ()):
        _check_gate(name, g, (B, N, H))
    if resolve_backend(backend, q, k, v) == "triton":
        raise ValueError("plstm1d has no Triton implementation; use backend='torch'")
    return plstm1d_naive(q, k, v, s, t, m, d, _scale(scale, q)).to(q.dtype)


def plstm_dag(
    q: Tensor, k: Tensor, v: Tensor, edges: Tensor, s: Tensor, t: Tensor, m: Tensor, d: Optional[Tensor] = None, *,
    scale: Optional[float] = None, backend: str = "auto",
) -> Tensor:
    """pLSTM on a DAG given as node features and an edge list (one state per edge).

    ``edges [E, 2]`` (src, dst) in topological order (every edge into a node before any edge out of it).
    ``s [B, E, H]``: source gate of each edge at its source; ``m [B, E, H]``: mark gate at its destination;
    ``t [B, P, H]``: transition gate of each ``(e_in, e_out)`` pair of :func:`line_graph_pairs`.
    ``C_e = Σ T_{e',e} C_{e'} + S_e k_u v_uᵀ``, ``h_w = Σ_{e→w} M_e s·q_wᵀ C_e + d_w s (q_w·k_w) v_w``.
    ``scale`` defaults to ``Dk^-1/2`` like the grid forms (the official graph code uses 1: pass
    ``scale=1.0`` to match it). PyTorch reference only.
    """
    _check_qkv(q, k, v)
    B, N, H = q.shape[:3]
    if not isinstance(edges, Tensor):
        raise ValueError("edges must be a LongTensor [E, 2]")
    check_topological(edges, N)
    pairs = line_graph_pairs(edges)
    E, P = edges.shape[0], pairs.shape[0]
    _check_gate("s", s, (B, E, H))
    _check_gate("m", m, (B, E, H))
    _check_gate("t", t, (B, P, H))
    if d is not None:
        _check_gate("d", d, (B, N, H))
    if resolve_backend(backend, q, k, v) == "triton":
        raise ValueError("plstm_dag has no Triton implementation; use backend='torch'")
    return plstm_dag_naive(q, k, v, edges, s, t, m, d, _scale(scale, q), pairs).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def check_chunk_size(name: str, value) -> int:
    """A chunk side: a power of two >= 1."""
    value = check_int(name, value, min=1)
    if value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {value}")
    return value


def _scale(scale, q):
    if scale is None:
        return q.shape[-1] ** -0.5
    return check_float("scale", scale, min=0.0, min_open=True)


def _check_qkv(q, k, v):
    check_qkv(q, k, v)
    if q.shape[1] == 0 or q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError("empty token or head dimension")


def _check_gate(name, g, lead, allow_orient=False):
    if not isinstance(g, Tensor) or not g.is_floating_point():
        raise ValueError(f"gate {name} must be a floating tensor")
    ok = tuple(g.shape) == tuple(lead) or (allow_orient and g.dim() == 4 and tuple(g.shape[:3]) == tuple(lead))
    if not ok:
        extra = " or [B, N, H, O]" if allow_orient else ""
        raise ValueError(f"gate {name} must be {list(lead)}{extra}, got {tuple(g.shape)}")


def _validated_2d(q, k, v, gates, d, hw, scale):
    _check_qkv(q, k, v)
    X, Y = check_hw(hw)
    B, N, H = q.shape[:3]
    if N != X * Y:
        raise ValueError(f"q has {N} tokens but hw={X}x{Y} needs {X * Y}")
    out, shape = [], None
    for name, g in zip(GATE_NAMES, gates):
        if g is None:
            if name in ("t_dl", "t_ru"):
                out.append(None)
                continue
            raise ValueError(f"gate {name} is required")
        _check_gate(name, g, (B, N, H), allow_orient=True)
        if g.dim() == 3:
            g = g[..., None]
        if shape is None:
            shape = g.shape
        elif g.shape != shape:
            raise ValueError(f"all gates must share one shape, {name} is {tuple(g.shape)} vs {tuple(shape)}")
        out.append(g)
    if shape[-1] not in (1, 4):
        raise ValueError(f"the orientation axis must have 1 or 4 entries, got {shape[-1]}")
    if d is not None:
        _check_gate("d", d, (B, N, H))
    return out, d, (X, Y), _scale(scale, q)


__all__ = [
    "DEFAULT_CHUNK",
    "check_chunk_size",
    "METHODS",
    "ORIENTATION_FLIPS",
    "gating_matrix_2d",
    "grid_dag",
    "grid_gates_to_dag",
    "line_graph_pairs",
    "plstm1d",
    "plstm2d",
    "plstm_dag",
]

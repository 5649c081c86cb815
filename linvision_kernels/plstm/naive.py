"""Node-by-node pLSTM recurrences: the oracle for every other implementation.

Conventions (see :func:`linvision.kernels.plstm.plstm2d` for the public contract):

- q, k ``[B, N, H, Dk]``, v ``[B, N, H, Dv]``; for a grid ``N = X·Y`` in raster order, node ``(x, y)`` at
  ``x·Y + y``: ``x`` is the slow axis (image rows), ``y`` the fast one (image columns). This is the
  official code's ``(B, X, Y, …)`` layout flattened.
- Scalar gates (every state-tracking dimension ``J = 1``, as in all shipped configs): ``[B, N, H]`` per
  orientation.
- States ``C`` are ``Dk × Dv`` matrices in fp32 (fp64 for fp64 inputs); outputs come back in fp32/fp64 and
  the public functions cast them to the input dtype.

2-D recurrence of one orientation (``C^r`` leaves a node towards ``x + 1``, ``C^d`` towards ``y + 1``)::

    C^r[x,y] = T^rl C^r[x-1,y] + T^ru C^d[x,y-1] + S^r k vᵀ
    C^d[x,y] = T^du C^d[x,y-1] + T^dl C^r[x-1,y] + S^d k vᵀ
    h[x,y]   = s·qᵀ (M^l C^r[x-1,y] + M^u C^d[x,y-1])          (s = scale, 1/√Dk by default)

with all gates taken at node ``(x, y)``, and states outside the grid zero. ``t_dl``/``t_ru`` may be
``None`` (a missing edge, D-mode's chirality). The direct term ``D s (q·k) v`` is added once, outside.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

# Orientations of the fused layer: (flip x, flip y) for [identity, flip X, flip Y, flip XY].
ORIENTATION_FLIPS: Tuple[Tuple[bool, bool], ...] = ((False, False), (True, False), (False, True), (True, True))


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32: the dtype of states and sums."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def flip_grid(t: Tensor, hw: Tuple[int, int], flip_x: bool, flip_y: bool, dim: int = 1) -> Tensor:
    """Flip the grid axis ``dim`` (of length X·Y, raster order) of ``t`` along x and/or y."""
    if not (flip_x or flip_y):
        return t
    X, Y = hw
    g = t.unflatten(dim, (X, Y))
    dims = [d for d, f in ((dim, flip_x), (dim + 1, flip_y)) if f]
    return g.flip(dims).flatten(dim, dim + 1)


def _scan2d_one(q, k, v, s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u, hw, scale):
    """One orientation, no direct term. Inputs already in the compute dtype. Returns [B, N, H, Dv]."""
    X, Y = hw
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    zero = q.new_zeros(B, H, Dk, Dv)
    c_r: List[List[Optional[Tensor]]] = [[None] * Y for _ in range(X)]
    c_d: List[List[Optional[Tensor]]] = [[None] * Y for _ in range(X)]
    out = []
    for x in range(X):
        for y in range(Y):
            n = x * Y + y

            def g(t):
                return t[:, n, :, None, None]

            left = c_r[x - 1][y] if x > 0 else zero
            up = c_d[x][y - 1] if y > 0 else zero
            kv = k[:, n, :, :, None] * v[:, n, :, None, :]
            cr = g(t_rl) * left + g(s_r) * kv
            if t_ru is not None:
                cr = cr + g(t_ru) * up
            cd = g(t_du) * up + g(s_d) * kv
            if t_dl is not None:
                cd = cd + g(t_dl) * left
            c_r[x][y], c_d[x][y] = cr, cd
            read = g(m_l) * left + g(m_u) * up
            out.append(torch.einsum("bhd,bhde->bhe", q[:, n] * scale, read))
    return torch.stack(out, dim=1)


def plstm2d_naive(
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
    d: Optional[Tensor],
    hw: Tuple[int, int],
    scale: float,
) -> Tensor:
    """2-D pLSTM by a node-by-node loop; arguments already validated.

    Gates are ``[B, N, H, O]`` with ``O`` orientations (1, or 4 for the fused layer's identity/flip X/flip
    Y/flip XY); orientation ``o`` runs the recurrence on the grid flipped by ``ORIENTATION_FLIPS[o]`` and
    its output is flipped back; the orientations are summed and ``d·s·(q·k)·v`` is added once.
    Returns fp32 (fp64 for fp64 inputs) ``[B, N, H, Dv]``.
    """
    ct = compute_dtype(q)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    O = s_r.shape[-1]
    out = None
    for o in range(O):
        fx, fy = ORIENTATION_FLIPS[o]

        def f(t):
            return None if t is None else flip_grid(t[..., o].to(ct) if t.dim() == 4 else t.to(ct), hw, fx, fy)

        res = _scan2d_one(
            flip_grid(q, hw, fx, fy), flip_grid(k, hw, fx, fy), flip_grid(v, hw, fx, fy),
            f(s_r), f(s_d), f(t_rl), f(t_du), f(t_dl), f(t_ru), f(m_l), f(m_u), hw, scale,
        )
        res = flip_grid(res, hw, fx, fy)
        out = res if out is None else out + res
    if d is not None:
        out = out + direct_term(q, k, v, d, scale)
    return out


def direct_term(q: Tensor, k: Tensor, v: Tensor, d: Tensor, scale: float) -> Tensor:
    """``d·s·(q·k)·v`` per token in the compute dtype: ``[B, N, H, Dv]``."""
    ct = compute_dtype(q)
    qk = (q.to(ct) * k.to(ct)).sum(-1, keepdim=True)
    return d.to(ct)[..., None] * scale * qk * v.to(ct)


# ----------------------------------------------------------------------------------------------------------
# 1-D and general DAG forms
# ----------------------------------------------------------------------------------------------------------


def plstm1d_naive(
    q: Tensor, k: Tensor, v: Tensor, s: Tensor, t: Tensor, m: Tensor, d: Optional[Tensor], scale: float
) -> Tensor:
    """Causal 1-D pLSTM (``plstm_1d.py::pLSTM1D_torch`` with J = 1) by a token loop.

    ``C_n = T_n C_{n-1} + S_n k_n v_nᵀ``,  ``h_n = s·q_nᵀ M_n C_{n-1} + d_n s (q_n·k_n) v_n``.
    Gates ``[B, N, H]``. Returns the compute dtype.
    """
    ct = compute_dtype(q)
    q, k, v, s, t, m = (x.to(ct) for x in (q, k, v, s, t, m))
    B, N, H, Dk = q.shape
    c = q.new_zeros(B, H, Dk, v.shape[-1])
    out = []
    for n in range(N):
        out.append(torch.einsum("bhd,bhde->bhe", q[:, n] * scale, m[:, n, :, None, None] * c))
        c = t[:, n, :, None, None] * c + s[:, n, :, None, None] * (k[:, n, :, :, None] * v[:, n, :, None, :])
    res = torch.stack(out, dim=1)
    if d is not None:
        res = res + direct_term(q, k, v, d, scale)
    return res


def line_graph_pairs(edges: Tensor) -> Tensor:
    """Transition slots of a DAG: all pairs ``(e_in, e_out)`` with ``dst(e_in) == src(e_out)``.

    ``edges`` is ``[E, 2]`` (src, dst). Returns a LongTensor ``[P, 2]`` sorted by ``e_out`` then ``e_in``;
    the transition gates of :func:`plstm_dag_naive` are indexed by this order.
    """
    src, dst = edges[:, 0], edges[:, 1]
    pairs = (dst[:, None] == src[None, :]).nonzero()  # (e_in, e_out) in row-major order of e_in
    order = torch.argsort(pairs[:, 1] * max(1, edges.shape[0]) + pairs[:, 0])
    return pairs[order]


def plstm_dag_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    edges: Tensor,
    s: Tensor,
    t: Tensor,
    m: Tensor,
    d: Optional[Tensor],
    scale: float,
    pairs: Optional[Tensor] = None,
) -> Tensor:
    """pLSTM on a DAG, one state per edge (``plstm_graph.py::plstm_graph_nodewise``, J = 1).

    ``edges [E, 2]`` (src, dst) in topological order: every edge into a node comes before every edge out
    of it. ``s [B, E, H]``: source gate of edge e at its source node; ``m [B, E, H]``: mark gate of edge e at
    its destination; ``t [B, P, H]``: transition gate of each pair of :func:`line_graph_pairs`.
    ``C_e = Σ_{e' → e} T_{e',e} C_{e'} + S_e k_u v_uᵀ`` (u = src e);
    ``h_w = Σ_{e into w} M_e s·q_wᵀ C_e + d_w s (q_w·k_w) v_w``. Returns the compute dtype.
    """
    ct = compute_dtype(q)
    q, k, v, s, t, m = (x.to(ct) for x in (q, k, v, s, t, m))
    if pairs is None:
        pairs = line_graph_pairs(edges)
    E = edges.shape[0]
    incoming: List[List[Tuple[int, int]]] = [[] for _ in range(E)]  # e_out -> [(pair index, e_in)]
    for p, (e_in, e_out) in enumerate(pairs.tolist()):
        incoming[e_out].append((p, e_in))
    B, N, H, Dk = q.shape
    out = [q.new_zeros(B, H, v.shape[-1]) for _ in range(N)]
    states: List[Tensor] = []
    for e, (u, w) in enumerate(edges.tolist()):
        c = s[:, e, :, None, None] * (k[:, u, :, :, None] * v[:, u, :, None, :])
        for p, e_in in incoming[e]:
            c = c + t[:, p, :, None, None] * states[e_in]
        states.append(c)
        out[w] = out[w] + torch.einsum("bhd,bhde->bhe", q[:, w] * scale, m[:, e, :, None, None] * c)
    res = torch.stack(out, dim=1)
    if d is not None:
        res = res + direct_term(q, k, v, d, scale)
    return res


def grid_dag(hw: Tuple[int, int], device=None) -> Tensor:
    """Edges of one orientation of an X×Y grid, topologically ordered: node by node in raster order,
    each node's right edge ``(x,y)→(x+1,y)`` then its down edge ``(x,y)→(x,y+1)``. ``[E, 2]``."""
    X, Y = hw
    edges = []
    for x in range(X):
        for y in range(Y):
            n = x * Y + y
            if x + 1 < X:
                edges.append((n, n + Y))
            if y + 1 < Y:
                edges.append((n, n + 1))
    return torch.tensor(edges, dtype=torch.long, device=device).reshape(-1, 2)


def grid_gates_to_dag(
    edges: Tensor,
    pairs: Tensor,
    hw: Tuple[int, int],
    s_r: Tensor,
    s_d: Tensor,
    t_rl: Tensor,
    t_du: Tensor,
    t_dl: Optional[Tensor],
    t_ru: Optional[Tensor],
    m_l: Tensor,
    m_u: Tensor,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Map single-orientation grid gates ``[B, N, H]`` onto the DAG of :func:`grid_dag`: ``(s, t, m)``."""
    X, Y = hw
    src, dst = edges[:, 0], edges[:, 1]
    right = dst == src + Y  # x-edges; the rest are y-edges (Y > 1, or X == 1)
    if Y == 1:
        right = torch.ones_like(right)
    s = torch.where(right[None, :, None], s_r[:, src], s_d[:, src])
    m = torch.where(right[None, :, None], m_l[:, dst], m_u[:, dst])
    zeros = torch.zeros_like(t_rl)
    t_dl = zeros if t_dl is None else t_dl
    t_ru = zeros if t_ru is None else t_ru
    e_in, e_out = pairs[:, 0], pairs[:, 1]
    node = src[e_out]
    in_r, out_r = right[e_in][None, :, None], right[e_out][None, :, None]
    t = torch.where(
        in_r,
        torch.where(out_r, t_rl[:, node], t_dl[:, node]),
        torch.where(out_r, t_ru[:, node], t_du[:, node]),
    )
    return s, t, m


def check_topological(edges: Tensor, num_nodes: int) -> None:
    """``ValueError`` unless ``edges [E, 2]`` are valid node indices in topological order."""
    if edges.dim() != 2 or edges.shape[-1] != 2 or edges.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"edges must be an integer tensor [E, 2] of (src, dst), got {tuple(edges.shape)} {edges.dtype}")
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= num_nodes):
        raise ValueError(f"edge endpoints must lie in [0, {num_nodes})")
    closed = set()  # nodes that already have an outgoing edge: no edge may enter them any more
    for u, w in edges.tolist():
        if u == w:
            raise ValueError(f"self-loop ({u}, {w}) in a DAG")
        if w in closed:
            raise ValueError(
                f"edges are not in topological order: edge into node {w} comes after an edge out of it"
            )
        closed.add(u)


"""Log-depth construction of a cell's transfer matrices (the official ``stmg_matrices``, J = 1).

A *cell* is an ``A × A`` block of grid nodes (``A = 2^level``). Its borders carry edge states: the **left**
border the ``A`` x-edges entering from ``x − 1`` (indexed by the cell-local ``y``), the **top** border the
``A`` y-edges entering from ``y − 1`` (indexed by local ``x``), the **right** and **bottom** borders the
edges leaving at ``x + A`` and ``y + A``. Everything a cell does is linear, so it is described by
(rows ← columns, batch dims in front):

======  ==============  ==========================================================================
name    shape           meaning
======  ==============  ==========================================================================
trl     ``A × A``       left border  → right border
tru     ``A × A``       top border   → right border
tdl     ``A × A``       left border  → bottom border
tdu     ``A × A``       top border   → bottom border
sr      ``A × A²``      node sources (``k vᵀ``) → right border
sd      ``A × A²``      node sources → bottom border
ml      ``A² × A``      left border → node marks (read by ``q``)
mu      ``A² × A``      top border  → node marks
g       ``A² × A²``     node → node inside the cell (no direct term)
======  ==============  ==========================================================================

Nodes inside a cell are in raster order (local ``(w, z)`` at ``w·A + z``). Level 0 is one node: its gates.
Level ``i + 1`` joins 2×2 children ``a = (0,0)``, ``b = (1,0)`` (high x), ``c = (0,1)`` (high y) and
``d = (1,1)``: ``a`` feeds ``b`` through x-edges and ``c`` through y-edges, ``b`` and ``c`` feed ``d``.
Each child's input borders are written as linear maps of the parent's inputs and the children's sources
(:class:`_Lin`), which gives all parent matrices at once; cross-child node pairs fill the parent's ``g``
(the official ``gating_matrices_2d`` adds exactly these quadrant blocks, level by level). Everything is
plain differentiable PyTorch.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor


class CellMatrices(NamedTuple):
    """Transfer matrices of every cell; each ``[..., NXc, NYc, rows, cols]`` (see the module docstring)."""

    trl: Tensor
    tru: Tensor
    tdl: Tensor
    tdu: Tensor
    sr: Tensor
    sd: Tensor
    ml: Tensor
    mu: Tensor
    g: Tensor

    @property
    def size(self) -> int:
        return self.trl.shape[-1]


class _Lin:
    """A linear map from named source blocks to one border: ``{block name: [..., A, block size]}``."""

    def __init__(self, parts: Dict[str, Tensor]):
        self.parts = parts

    def __add__(self, other: "_Lin") -> "_Lin":
        parts = dict(self.parts)
        for key, val in other.parts.items():
            parts[key] = parts[key] + val if key in parts else val
        return _Lin(parts)

    def after(self, mat: Tensor) -> "_Lin":
        """``mat @ self``."""
        return _Lin({key: mat @ val for key, val in self.parts.items()})

    def block(self, key: str, rows: int, cols: int, like: Tensor) -> Tensor:
        val = self.parts.get(key)
        if val is None:
            return like.new_zeros(*like.shape[:-2], rows, cols)
        return val


def level0(s_r: Tensor, s_d: Tensor, t_rl: Tensor, t_du: Tensor, t_dl: Optional[Tensor], t_ru: Optional[Tensor],
           m_l: Tensor, m_u: Tensor) -> CellMatrices:
    """Single-node cells from gates ``[..., X, Y]``; a missing ``t_dl``/``t_ru`` is zero."""
    def one(t):
        return t[..., None, None]

    zeros = torch.zeros_like(t_rl)
    return CellMatrices(
        trl=one(t_rl), tru=one(zeros if t_ru is None else t_ru), tdl=one(zeros if t_dl is None else t_dl),
        tdu=one(t_du), sr=one(s_r), sd=one(s_d), ml=one(m_l), mu=one(m_u), g=one(zeros),
    )


def _child(t: Tensor, cx: int, cy: int) -> Tensor:
    return t[..., cx::2, cy::2, :, :]


def combine(cm: CellMatrices) -> CellMatrices:
    """One doubling level: cells of size A on an even × even cell grid → cells of size 2A."""
    A = cm.size
    kids = {name: {k: _child(t, *pos) for k, t in cm._asdict().items()} for name, pos in
            (("a", (0, 0)), ("b", (1, 0)), ("c", (0, 1)), ("d", (1, 1)))}
    ref = kids["a"]["trl"]

    def eye_block(key):
        eye = torch.eye(A, dtype=ref.dtype, device=ref.device).expand(*ref.shape[:-2], A, A)
        return _Lin({key: eye})

    def outputs(kid, left: _Lin, top: _Lin):
        m = kids[kid]
        own = {"n" + kid: m["sr"]}
        right = left.after(m["trl"]) + top.after(m["tru"]) + _Lin(own)
        bottom = left.after(m["tdl"]) + top.after(m["tdu"]) + _Lin({"n" + kid: m["sd"]})
        return right, bottom

    ins = {"a": (eye_block("La"), eye_block("Ua"))}
    r_a, b_a = outputs("a", *ins["a"])
    ins["b"] = (r_a, eye_block("Ub"))
    ins["c"] = (eye_block("Lc"), b_a)
    r_b, b_b = outputs("b", *ins["b"])
    r_c, b_c = outputs("c", *ins["c"])
    ins["d"] = (r_c, b_b)
    r_d, b_d = outputs("d", *ins["d"])

    # node blocks in child-major order (cx, cy) = a, c, b, d; permuted to raster order at the end
    node_keys = ("na", "nc", "nb", "nd")
    kid_order = ("a", "c", "b", "d")

    def rows2(top_lin: _Lin, bot_lin: _Lin, keys, cols):
        return torch.cat(
            [torch.cat([lin.block(k, A, cols, ref) for k in keys], dim=-1) for lin in (top_lin, bot_lin)], dim=-2
        )

    trl = rows2(r_b, r_d, ("La", "Lc"), A)
    tru = rows2(r_b, r_d, ("Ua", "Ub"), A)
    tdl = rows2(b_c, b_d, ("La", "Lc"), A)
    tdu = rows2(b_c, b_d, ("Ua", "Ub"), A)
    sr = rows2(r_b, r_d, node_keys, A * A)
    sd = rows2(b_c, b_d, node_keys, A * A)

    ml_rows, mu_rows, g_rows = [], [], []
    for kid in kid_order:
        left, top = ins[kid]
        m = kids[kid]
        read = left.after(m["ml"]) + top.after(m["mu"])  # [.., A², ·] per source block
        ml_rows.append(torch.cat([read.block(k, A * A, A, ref) for k in ("La", "Lc")], dim=-1))
        mu_rows.append(torch.cat([read.block(k, A * A, A, ref) for k in ("Ua", "Ub")], dim=-1))
        g_blocks = []
        for other, key in zip(kid_order, node_keys):
            blk = read.block(key, A * A, A * A, ref)
            if other == kid:
                blk = blk + m["g"]
            g_blocks.append(blk)
        g_rows.append(torch.cat(g_blocks, dim=-1))
    ml = torch.cat(ml_rows, dim=-2)
    mu = torch.cat(mu_rows, dim=-2)
    g = torch.cat(g_rows, dim=-2)

    # child-major node order (cx, cy, w, z) → raster (cx, w, cy, z) on the node axes
    def perm_rows(t):
        sh = t.shape
        return t.reshape(*sh[:-2], 2, 2, A, A, sh[-1]).transpose(-4, -3).reshape(sh)

    def perm_cols(t):
        sh = t.shape
        return t.reshape(*sh[:-1], 2, 2, A, A).transpose(-3, -2).reshape(sh)

    return CellMatrices(
        trl=trl, tru=tru, tdl=tdl, tdu=tdu, sr=perm_cols(sr), sd=perm_cols(sd),
        ml=perm_rows(ml), mu=perm_rows(mu), g=perm_cols(perm_rows(g)),
    )


def cell_matrices(
    s_r: Tensor, s_d: Tensor, t_rl: Tensor, t_du: Tensor, t_dl: Optional[Tensor], t_ru: Optional[Tensor],
    m_l: Tensor, m_u: Tensor, levels: int,
) -> CellMatrices:
    """Transfer matrices of ``2^levels``-sized cells from gates ``[..., X, Y]`` (X, Y multiples of the size)."""
    cm = level0(s_r, s_d, t_rl, t_du, t_dl, t_ru, m_l, m_u)
    for _ in range(levels):
        cm = combine(cm)
    return cm

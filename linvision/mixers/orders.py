"""Token orders over a 2-D grid for the recurrent mixers (gla, lion, gated_delta, kda).

A recurrence reads tokens one after another; on an ``h × w`` grid the order is a choice:

- ``"raster"``: row after row (the layout of ``x``), as ViG, LION ("Normal") and SANA scan;
- ``"column"``: column after column;
- ``"cross"``: the four-direction cross-scan of vision Mamba (VMamba's ``CrossScan``): raster and column orders,
  each scanned in both directions; the two bidirectional results are averaged (VMamba's ``CrossMerge`` sums its
  four directions; the mean keeps the output scale of a single order).

Prefix tokens (class, registers, text) lead the sequence in every order, before the first image token, as
LION's class token at position 0: the forward half carries them to every image token and the backward half
carries every image token to them.
"""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

ORDERS = ("raster", "column", "cross")
BASE_ORDERS = {"raster": ("raster",), "column": ("column",), "cross": ("raster", "column")}


def order_index(hw: Tuple[int, int], order: str, num_prefix_tokens: int, device=None) -> Tensor:
    """LongTensor ``[P + h·w]``: position ``n`` of the scan reads token ``index[n]`` of ``x`` (prefix first)."""
    h, w = hw
    grid = torch.arange(h * w, device=device).view(h, w)
    if order == "column":
        grid = grid.t()
    elif order != "raster":
        raise ValueError(f"unknown base order {order!r}; expected 'raster' or 'column'")
    prefix = torch.arange(num_prefix_tokens, device=device)
    return torch.cat([prefix, grid.reshape(-1) + num_prefix_tokens])


def scan_in_orders(
    scan: Callable[..., Tensor], tensors: Sequence[Tensor], hw: Tuple[int, int], num_prefix_tokens: int, order: str,
) -> Tensor:
    """Run ``scan(*tensors_in_order)`` (tensors ``[B, N, ...]``, result ``[B, N, ...]``) in each base order of
    ``order`` and average the results, back in the layout of ``x``. ``"raster"`` costs no copy."""
    outs = []
    for base in BASE_ORDERS[order]:
        if base == "raster":
            outs.append(scan(*tensors))
            continue
        idx = order_index(hw, base, num_prefix_tokens, tensors[0].device)
        out = scan(*(t.index_select(1, idx) for t in tensors))
        outs.append(out.index_select(1, torch.argsort(idx)))
    return outs[0] if len(outs) == 1 else sum(outs) / len(outs)


__all__ = ["BASE_ORDERS", "ORDERS", "order_index", "scan_in_orders"]

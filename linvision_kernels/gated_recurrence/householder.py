"""DeltaProduct's ``n_h`` Householder steps per token as one scan over ``N·n_h`` sub-steps (fla's interleaving).

Paper: Siems et al. 2025, "DeltaProduct: Improving State-Tracking in Linear RNNs via Householder Products"
(arXiv 2502.10297). Official code: ``fla-org/flash-linear-attention``, ``fla/ops/gated_delta_product/chunk.py``
(``g_interleaved``: the gate on the first sub-step, zeros elsewhere; ``q_new``: the query on the last sub-step)
and ``naive.py`` (the token loop: decay once, ``n_h`` delta steps, then read).

Token ``t`` owns the sub-steps ``t·n_h … t·n_h + n_h − 1`` of ``k, v, β``. The scan of the interleaved sequence
decays the state at sub-step 0 only and reads it at sub-step ``n_h − 1`` (an inclusive read: after all ``n_h``
writes) or at sub-step 0 (an exclusive read: decayed, before the first write); the other sub-steps have ``q = 0``
and their outputs are dropped. Reversing the order (``direction="backward"``) reverses the tokens and keeps each
token's Householder steps in their order ``1 … n_h`` (:func:`flip_tokens`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def flip_tokens(t: Optional[Tensor], steps: int) -> Optional[Tensor]:
    """Reverse ``t [B, N·steps, ...]`` token by token, each token's ``steps`` sub-steps kept in order."""
    if t is None:
        return None
    if steps == 1:
        return t.flip(1)
    return t.unflatten(1, (-1, steps)).flip(1).flatten(1, 2)


def _spread(t: Tensor, steps: int, at: int) -> Tensor:
    """``t [B, N, ...]`` → ``[B, N·steps, ...]``: ``t`` at sub-step ``at`` of every token, zeros elsewhere."""
    parts = [torch.zeros_like(t)[:, :, None]] * steps
    parts[at] = t[:, :, None]
    return torch.cat(parts, 2).flatten(1, 2)


def interleave(q: Tensor, g: Optional[Tensor], steps: int, exclusive: bool):
    """Queries on the read sub-step (last, or first when ``exclusive``) and the log decay ``g [B, N, H, 1 or Dk]``
    on the first, both as ``[B, N·steps, ...]``; unchanged for ``steps = 1``."""
    if steps == 1:
        return q, g
    return _spread(q, steps, 0 if exclusive else steps - 1), None if g is None else _spread(g, steps, 0)


def reads(o: Tensor, steps: int, exclusive: bool) -> Tensor:
    """The outputs of the read sub-steps, ``[B, N·steps, H, Dv]`` → ``[B, N, H, Dv]``."""
    if steps == 1:
        return o
    return o.unflatten(1, (-1, steps))[:, :, 0 if exclusive else steps - 1]


__all__ = ["flip_tokens", "interleave", "reads"]

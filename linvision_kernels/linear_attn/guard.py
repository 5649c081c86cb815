"""Exact power-of-two divisors that keep ReLU linear attention's fp32 sums finite, found as keys stream in.

``o_i = Σ_j (φq_i·φk_j) v_j / (Σ_j φq_i·φk_j + eps)`` with ``φ = ReLU`` does not change (up to eps) when ``q`` or
``k`` is divided by a positive number, and is linear in ``v``. Dividing each per (batch, head) by a power of two
that brings its largest feature below ``2**GUARD_EXPONENT`` keeps the sums finite at any bf16/fp16 input, and is
exact: the divisor is 1 for every peak below ``2**GUARD_EXPONENT`` (ordinary inputs are not touched at all), and
a power of two changes no mantissa bit.

:func:`guarded_relu_state` sums the key state chunk by chunk while the divisors are still growing: when a chunk
raises a peak, the sums so far are multiplied by the exact ratio of the old divisor to the new one. So the keys and
values are never held whole, and the state equals the one made with the final divisors from the start (bit for bit,
short of an fp32 subnormal).
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

from .state import LinearAttentionState, state_of

GUARD_EXPONENT = 16


def power_of_two_guard(peak: Tensor) -> Tensor:
    """``2**max(0, e − GUARD_EXPONENT)`` with ``2**(e−1) ≤ peak < 2**e``: an exact fp32 divisor that brings
    ``peak`` below ``2**GUARD_EXPONENT`` (1 for every ``peak < 2**GUARD_EXPONENT``)."""
    _, exponent = torch.frexp(peak.float())
    return torch.ldexp(torch.ones_like(peak, dtype=torch.float32), (exponent - GUARD_EXPONENT).clamp(min=0))


def relu_guard(t: Tensor) -> Tensor:
    """The divisor ``[B, 1, H]`` (fp32) for the ReLU features of ``t [B, N, H, D]``; constant for autograd."""
    with torch.no_grad():
        return power_of_two_guard(t.amax(dim=(1, 3)).clamp(min=0)).unsqueeze(1)


def magnitude_guard(t: Tensor) -> Tensor:
    """The divisor ``[B, 1, H]`` (fp32) for ``|t|``, ``t [B, N, H, D]`` (the values); constant for autograd."""
    with torch.no_grad():
        return power_of_two_guard(torch.maximum(t.amax(dim=(1, 3)), -t.amin(dim=(1, 3)))).unsqueeze(1)


def guarded_relu_state(chunks: Iterable[Tuple[Tensor, Tensor]]) -> Tuple[LinearAttentionState, Tensor, Tensor]:
    """``(state, s_k, s_v)``: the fp32 key sums of ``ReLU(k / s_k)`` and ``v / s_v`` over the key chunks
    ``(k [B, m, H, Dk], v [B, m, H, Dv])`` (at least one), with ``s_k = relu_guard(k)`` and ``s_v =
    magnitude_guard(v)`` ``[B, 1, H]`` of all the keys and values together."""
    state: Optional[LinearAttentionState] = None
    for k, v in chunks:
        s_k, s_v = relu_guard(k), magnitude_guard(v)
        if state is not None:
            s_k, s_v = torch.maximum(s_k, old_k), torch.maximum(s_v, old_v)
            if not (torch.equal(s_k, old_k) and torch.equal(s_v, old_v)):  # a larger peak: rescale the sums so far
                r_k, r_v = (old_k / s_k)[:, 0], (old_v / s_v)[:, 0]  # [B, H], exact powers of two ≤ 1
                state = LinearAttentionState(
                    state.kv * (r_k * r_v)[..., None, None], state.k_sum * r_k[..., None], state.v_sum * r_v[..., None],
                    state.count,
                )
        B, m, H = k.shape[:3]
        part = state_of(k, v, k_weight=(1.0 / s_k).expand(B, m, H), v_weight=(1.0 / s_v).expand(B, m, H),
                        feature_map="relu")
        state = part if state is None else state + part
        old_k, old_v = s_k, s_v
    if state is None:
        raise ValueError("at least one key chunk is needed")
    return state, old_k, old_v


__all__ = ["GUARD_EXPONENT", "guarded_relu_state", "magnitude_guard", "power_of_two_guard", "relu_guard"]

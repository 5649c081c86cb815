"""A teacher's rotary position embedding (RoPE), handed to a mixer for a call, and how mixers apply it.

timm's EVA02 and RoPE ViTs (``timm/models/eva.py``: ``EvaAttention``, ``AttentionRope``) compute one RoPE
tensor per forward (``rope = model.rope.get_embed()``: ``cat(sin, cos)``, shape ``[N_img, 2·D]``, or
``[H, N_img, 2·D]`` per block for the learned "mixed" frequencies) and pass it to every block's attention,
which rotates q and k of the image tokens only (the ``num_prefix_tokens`` class/register tokens are left as
they are) with ``timm/layers/pos_embed_sincos.py::apply_rot_embed_cat`` (``x·cos + rot(x)·sin``; ``rot``
pairs ``(x₀, x₁) → (−x₁, x₀)``, or with ``rotate_half`` ``(x_i, x_{i+D/2})``). :class:`Rotation` carries
that tensor in the mixers' ``[B, N, H, D]`` layout (a mixer gets it for the calls inside
``with mixer.rotation(rope):``) and :meth:`Rotation.apply` reproduces the rotation.

Softmax mixers (``softmax``, ``clear``, the window part of ``lolcats``) rotate q and k as the teacher does.
Linear mixers follow RoFormer's linear-attention form (Su et al., "RoFormer: Enhanced Transformer with
Rotary Position Embedding", arXiv 2104.09864, §3.3, Eq. 19): the rotation is applied to the *features*
``φ(q), φ(k)`` in the numerator only, the normaliser ``φ(q_i)·Σ_j φ(k_j)`` stays unrotated, so it stays
positive (the convention of NaLaFormer and of fla's and LightNet's rotary linear attention). Features wider
than the head (Hedgehog's ``[softmax(z), softmax(−z)]``, ``2·D``) are rotated per block of ``D``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..kernels.linear_attn import linear_attention


def _rot_pairs(t: Tensor) -> Tensor:
    """``[x₀, x₁, x₂, x₃, …] → [−x₁, x₀, −x₃, x₂, …]`` (timm's interleaved layout)."""
    return torch.stack([-t[..., 1::2], t[..., ::2]], -1).reshape(t.shape)


def _rot_half(t: Tensor) -> Tensor:
    """``[a, b] → [−b, a]`` over the two halves of the last dim (timm's ``rotate_half`` layout)."""
    a, b = t.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Rotation(NamedTuple):
    """RoPE of one call for the image tokens: ``sin, cos [..., N_img, H | 1, D]`` (leading batch dim or none).

    ``half``: timm's ``rotate_half`` layout, else interleaved pairs. Built by :meth:`from_timm`.
    """

    sin: Tensor
    cos: Tensor
    half: bool

    @classmethod
    def from_timm(cls, rope: Tensor, half: bool) -> "Rotation":
        """From timm's ``rope`` (``cat(sin, cos)`` in the attention's ``[B, H, N, D]`` layout: ``[N, 2D]``,
        ``[H, N, 2D]`` or ``[B, H | 1, N, 2D]``)."""
        if not isinstance(rope, Tensor) or not 2 <= rope.dim() <= 4 or rope.shape[-1] % 2:
            raise ValueError(f"expected timm's rope tensor [..., N, 2·head_dim], got {tuple(getattr(rope, 'shape', ()))}")
        t = rope if rope.dim() > 2 else rope.unsqueeze(0)
        sin, cos = t.movedim(-2, -3).chunk(2, -1)  # [..., N, H | 1, D]
        return cls(sin, cos, bool(half))

    @property
    def tokens(self) -> int:
        """Image tokens the embedding covers."""
        return self.sin.shape[-3]

    def apply(self, t: Tensor, num_prefix_tokens: int) -> Tensor:
        """``t [B, N, H, m·D]`` with its image tokens (after the first ``num_prefix_tokens``) rotated.

        ``m = 1``: timm's ``apply_rot_embed_cat`` (same operations and dtypes: sin/cos promote, the result
        is cast back to ``t``'s dtype). ``m > 1`` (wider features): each block of ``D`` rotated alike.
        """
        D = self.sin.shape[-1]
        T = num_prefix_tokens
        if t.shape[-1] % D or t.shape[1] - T != self.tokens:
            raise ValueError(f"RoPE for {self.tokens} image tokens of {D} dims cannot rotate {tuple(t.shape)} "
                             f"after {T} prefix tokens")
        img = t[:, T:]
        m = t.shape[-1] // D
        sin, cos = self.sin, self.cos
        if m > 1:
            img, sin, cos = img.unflatten(-1, (m, D)), sin.unsqueeze(-2), cos.unsqueeze(-2)
        rot = _rot_half(img) if self.half else _rot_pairs(img)
        out = (img * cos + rot * sin).to(t.dtype)
        if m > 1:
            out = out.flatten(-2)
        return torch.cat([t[:, :T], out], 1) if T else out


def rotary_linear_attention(fq: Tensor, fk: Tensor, v: Tensor, rope: Rotation, num_prefix_tokens: int, eps: float,
                            backend: str = "auto") -> Tensor:
    """RoFormer's linear attention with RoPE (Eq. 19): ``o_i = Σ_j (R_i φq_i)·(R_j φk_j) v_j / (φq_i·Σ_j φk_j + eps)``.

    ``fq, fk [B, N, H, F]`` (features already mapped, ``F`` a multiple of the RoPE's ``D``), ``v [B, N, H, Dv]``;
    ``R`` rotates the image tokens only (prefix tokens: identity). The kernel
    :func:`linvision.kernels.linear_attn.linear_attention` with the unrotated features as ``q_den, k_den``.
    """
    T = num_prefix_tokens
    return linear_attention(rope.apply(fq, T), rope.apply(fk, T), v, q_den=fq, k_den=fk, eps=eps, backend=backend)


__all__ = ["Rotation", "rotary_linear_attention"]

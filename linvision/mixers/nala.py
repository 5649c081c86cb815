"""NaLaFormer's norm-aware linear attention (NaLa) and the softmax attention of its hybrid stages.

Paper: "Norm × Direction: Restoring the Missing Query Norm in Vision Linear Attention" (Meng et al.,
arXiv 2506.21137, ICML 2026; v1 was titled "NaLaFormer: Norm-Aware Linear Attention for Transformer Models").
Official code followed, read at commit 1f1c10aeab8cd9a665bf74cbc589b4737d23d5ca:

- ``ZacharyMeng/NaLaFormer: NaLaformer/NALA.py::NormAwareLinearAttn``  →  :class:`NormAwareLinearAttn` (``"nala"``)
- ``ZacharyMeng/NaLaFormer: NaLaformer/NALA.py::VanillaSelfAttention`` →  :class:`VanillaSelfAttention` (``"nala_softmax"``)
- ``ZacharyMeng/NaLaFormer: NaLaformer/NALA.py::RoPE``, ``::theta_shift``, ``::rotate_every_two`` → :func:`rope_2d`, :func:`apply_rope`

Forward of ``"nala"`` per head (``d = head_dim``, ``N`` tokens, ``x (B, N, C)``)::

    q, k, v, g = split(qkvg(x))                      qkvg = Linear(C, 4C); each (B, N, H, d), fp32
    lepe       = DWConv5x5(v)                        in image layout, groups = C
    k          = k ** 3
    n          = ‖q‖₂ (per token and head),   p = 3 · (0.5 + tanh(n))
    φq         = [(ReLU(q)/n)^p, (ReLU(−q)/n)^p]      (B, N, H, 2d)
    φk         = [ReLU(k), ReLU(−k)]                  (B, N, H, 2d)
    φq', φk'   = RoPE2D on each d-dim half of φq, φk  (the numerator's features only)
    o          = (φq' · (1/N)Σ_j φk'_j v_jᵀ) / (φq · mean_j φk_j + 1e-6)     via linear_attention
    out        = out_proj(LayerNorm(o + lepe) · SiLU(g))

RoPE: ``angle = 1 / base^linspace(0, 1, d/4)`` (base 10000), each angle repeated for one pair of dims;
dims ``[0, d/2)`` rotate by the row index, ``[d/2, d)`` by the column index; a pair ``(x₀, x₁)`` becomes
``(x₀ cos − x₁ sin, x₁ cos + x₀ sin)`` (``theta_shift``). It is computed in every call from ``hw``.

``"nala_softmax"`` (the stages 3–4 block of the released hybrid models) shares the wrapper (``qkvg``,
``lepe``, ``ln``, SiLU gate, ``out_proj``) and computes ``softmax(RoPE(q)·RoPE(k)ᵀ / √d) v`` instead.

Parameter names are the official ones (``qkvg``, ``lepe``, ``out_proj``, ``ln``), so a state dict of the
official attention module loads as it is. They differ from the ``qkv``/``proj`` of the timm-style mixers.

Prefix tokens (the official model has none) are defined here as: RoPE angle 0 (the identity), zero
``lepe`` (the convolution sees only the ``h×w`` image tokens), and otherwise ordinary tokens: they are
queries and keys of the attention, and they count in the ``1/N`` mean.

Deviations from the official code (outputs equal for fp32 inputs, up to rounding, unless stated):

- Input/output are tokens ``(B, N, C)`` with ``hw`` instead of ``(B, C, H, W)``; RoPE sin/cos are built
  from ``hw`` in each call, instead of once per stage in ``BasicLayer`` and passed in. Same values.
- The attention core runs on :func:`linvision.kernels.linear_attn.linear_attention` (fp32 states,
  ``mean=True``, ``eps=1e-6`` added where the official adds it), not on explicit matmuls; on the PyTorch
  path through its chunked form ``linear_attention_streamed``: features, RoPE, LePE, LayerNorm, gate and
  ``out_proj`` are evaluated one chunk of tokens at a time (same values; cache-sized temporaries).
- Prefix tokens, as described above (an extension).
- ``head_dim`` not a multiple of 4: the official RoPE crashes with a shape mismatch (a crash, so fixed):
  here the first ``4·(head_dim // 4)`` dims are laid out as officially (rows then columns) and the
  remaining ``head_dim mod 4`` dims are not rotated.
- ``norm_eps`` (default 0, the official behaviour): the query norm is ``max(‖q‖, norm_eps)``. With 0 an
  exactly-zero query head gives NaN, as in the official code (reproduced for parity); any ``norm_eps > 0``
  is the fix.
- Dtypes: the official module casts to fp32 after ``qkvg`` and then applies ``ln`` and ``out_proj`` with
  the module's parameters, which fails for an fp16/bf16 module. Here ``lepe``, the features, the core,
  LayerNorm and gate run in fp32 (fp64 for fp64 inputs; parameters upcast), and the result is cast to
  the input dtype before ``out_proj``. For ``"nala_softmax"`` ``lepe`` runs in the input dtype, as officially.
- Options the official code does not have: ``rope=False`` (no rotation: plain normalised form),
  ``rope_base``, ``qkv_bias``/``proj_bias`` (official: both True), ``backend``. The official module also
  stores an unused ``scale``; it is not kept (it is not a parameter).

Numerics: ``pow`` backward at base 0 is finite: ``d/dp x^p`` at ``x = 0`` is 0 in PyTorch, and
``d/dx x^p = p·x^(p−1)`` is 0 there as ``p ≥ 1.5``; so the exact zeros of the sign split (and exact
zeros in ``q``) give finite gradients. A Triton port must keep ``where(x > 0, x^p·log x, 0)``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.validation import check_bool, check_float
from .base import TokenMixer
from .token_chunks import TokenRows, linear_rows, map_token_ranges, reusable_output
from .token_conv import depthwise_conv_reach, depthwise_conv_tokens

LEPE_KERNEL = 5  # official: Conv2d(dim, dim, 5, 1, 2, groups=dim)
NALA_EPS = 1e-6  # official: z = 1 / (q · mean(k) + 1e-6)


def rope_angles(head_dim: int, base: float = 10000.0, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Angles of one spatial axis in ``dtype``, length ``2·(head_dim // 4)``: ``1/base^linspace(0, 1, d/4)``,
    each twice."""
    n = head_dim // 4
    inv = 1.0 / (base ** torch.linspace(0, 1, n, dtype=dtype, device=device))
    return inv.repeat_interleave(2)


def rope_2d(
    head_dim: int,
    hw: Tuple[int, int],
    num_prefix_tokens: int = 0,
    base: float = 10000.0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """``(sin, cos)``, each ``(num_prefix_tokens + h·w, r)`` in ``dtype`` with ``r = 4·(head_dim // 4)``.

    Image token ``(i, j)`` (raster order) gets angles ``i·angle`` on dims ``[0, r/2)`` and ``j·angle`` on
    ``[r/2, r)``; prefix tokens get angle 0 (sin 0, cos 1). Dims ``[r, head_dim)`` are left to
    :func:`apply_rope`, which does not rotate them.
    """
    h, w = hw
    angle = rope_angles(head_dim, base, device, dtype)
    half = angle.numel()
    rows = torch.arange(h, dtype=dtype, device=device)[:, None] * angle  # (h, r/2)
    cols = torch.arange(w, dtype=dtype, device=device)[:, None] * angle  # (w, r/2)
    theta = torch.cat((rows[:, None, :].expand(h, w, half), cols[None, :, :].expand(h, w, half)), dim=-1)
    theta = theta.reshape(h * w, 2 * half)
    if num_prefix_tokens:
        theta = torch.cat((theta.new_zeros(num_prefix_tokens, 2 * half), theta), dim=0)
    return theta.sin(), theta.cos()


def rotate_pairs(x: Tensor) -> Tensor:
    """``(x₀, x₁, x₂, x₃, …) → (−x₁, x₀, −x₃, x₂, …)`` over the last dim (even length)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """``x·cos + rotate_pairs(x)·sin`` on the first ``r = sin.shape[-1]`` dims of ``x``; the rest unchanged.

    ``sin``, ``cos`` must broadcast against ``x[..., :r]``.
    """
    r = sin.shape[-1]
    if r == 0:
        return x
    head = x[..., :r] if r < x.shape[-1] else x
    rotated = head * cos + rotate_pairs(head) * sin
    return rotated if r == x.shape[-1] else torch.cat((rotated, x[..., r:]), dim=-1)


class _NaLaWrapper(TokenMixer):
    """Shared parts: ``qkvg`` projection, ``lepe`` DWConv on v, ``ln``, SiLU gate, ``out_proj``, 2-D RoPE."""

    lepe_fp32 = False  # lepe in the input dtype (VanillaSelfAttention); NaLa overrides

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        proj_bias: bool,
        rope: bool,
        rope_base: float,
        backend: str,
    ):
        super().__init__(dim, num_heads)
        self.rope = check_bool("rope", rope)
        self.rope_base = check_float("rope_base", rope_base, min=1.0, min_open=True)
        self.backend = check_backend(backend)
        # Official names and creation order: qkvg, act, lepe, out_proj, ln.
        self.qkvg = nn.Linear(dim, 4 * dim, bias=check_bool("qkv_bias", qkv_bias))
        self.act = nn.SiLU()
        self.lepe = nn.Conv2d(dim, dim, LEPE_KERNEL, 1, LEPE_KERNEL // 2, groups=dim)
        self.out_proj = nn.Linear(dim, dim, bias=check_bool("proj_bias", proj_bias))
        self.ln = nn.LayerNorm(dim)

    def local_term(
        self, v: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, start: int = 0, stop: Optional[int] = None
    ) -> Tensor:
        """``lepe`` of tokens ``start:stop``: ``v (B, N, C)`` → ``(B, stop − start, C)`` in ``v``'s dtype; zero
        rows for the prefix tokens. Only the grid rows around the range are convolved."""
        weight, bias = self.lepe.weight.to(v.dtype), self.lepe.bias.to(v.dtype)
        return depthwise_conv_tokens(v, hw, num_prefix_tokens, weight, bias, start, stop)

    def rope_tables(
        self, hw: Tuple[int, int], num_prefix_tokens: int, device, dtype: torch.dtype = torch.float32
    ) -> Tuple[Tensor, Tensor]:
        """RoPE ``(sin, cos)`` in ``dtype`` shaped ``(N, 1, r)`` to broadcast over ``[B, N, H, r]``."""
        sin, cos = rope_2d(self.head_dim, hw, num_prefix_tokens, self.rope_base, device, dtype)
        return sin[:, None, :], cos[:, None, :]

    def attend(
        self, q: Tensor, k: Tensor, v: Tensor, hw: Tuple[int, int], num_prefix_tokens: int,
        output: Optional[Callable[[int, int, Tensor], Tensor]] = None,
    ) -> Tensor:
        """fp32 (fp64) ``[B, N, H, d]`` q, k, v → ``o [B, N, H, d]`` in their dtype; with ``output``, the stacked
        ``output(a, b, o[:, a:b])`` over chunks of tokens instead (token-wise epilogue)."""
        raise NotImplementedError

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        C, N = x.shape[-1], x.shape[1]
        acc = accumulation_dtype(x.dtype)  # fp32, fp64 for fp64 x
        q, k, v, g = linear_rows(self.qkvg, x, 4)  # each (a, b) → (B, b − a, C), projected per range of tokens
        v = v(0, N)  # whole: lepe of a chunk reads the rows around it
        v_acc = v.to(acc)
        lepe_in = v_acc if self.lepe_fp32 else v
        heads = lambda t: t.to(acc).unflatten(-1, (self.num_heads, self.head_dim))  # noqa: E731
        ln_weight, ln_bias = self.ln.weight.to(acc), self.ln.bias.to(acc)

        def output(a: int, b: int, o: Tensor) -> Tensor:  # attention output chunk [B, b − a, H, d] → (B, b − a, C)
            lepe = self.local_term(lepe_in, hw, num_prefix_tokens, a, b)
            o = F.layer_norm(o.flatten(2) + lepe.to(acc), (C,), ln_weight, ln_bias, self.ln.eps)
            return self.out_proj((o * self.act(g(a, b).to(acc))).to(x.dtype))

        # token-wise: cache-sized temporaries; the outputs go into v's own buffer when it is one (each chunk once
        # lepe reads none of its rows)
        return self.attend_rows(
            lambda a, b: heads(q(a, b)), lambda a, b: heads(k(a, b)), heads(v_acc), hw, num_prefix_tokens, output,
            **reusable_output(v, x, depthwise_conv_reach(hw, LEPE_KERNEL)),
        )

    def attend_rows(
        self, q: TokenRows, k: TokenRows, v: Tensor, hw: Tuple[int, int],
        num_prefix_tokens: int, output: Optional[Callable[[int, int, Tensor], Tensor]] = None, **out,
    ) -> Tensor:
        """:meth:`attend` with q and k as functions of a token range (``q(a, b)`` is ``q[:, a:b]``), each range asked
        for once; this form builds them whole. ``out``: ``out``/``out_lag`` of ``linear_attention_streamed`` for the
        streamed forms (a buffer the results may go into); unused here."""
        N = v.shape[1]
        return self.attend(q(0, N), k(0, N), v, hw, num_prefix_tokens, output)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rope={self.rope}, rope_base={self.rope_base:g}"


class NormAwareLinearAttn(_NaLaWrapper):
    """NaLa: query-norm-aware power kernel, sign split, 2-D RoPE in the numerator only; O(N·2d·d) per head.

    ``x (B, N, C) → (B, N, C)``; ``N = num_prefix_tokens + h·w``. Options:

    - ``norm_eps`` (0.0 = official): lower bound of the query norm; > 0 avoids the NaN of an all-zero query.
    - ``rope`` (True = official): False drops the rotation (plain normalised linear attention on φq, φk).
    - ``rope_base`` (10000), ``qkv_bias``/``proj_bias`` (True), ``backend`` of the linear-attention kernel.

    See the module docstring for the equations and every deviation from ``NALA.py::NormAwareLinearAttn``.
    """

    lepe_fp32 = True  # official: qkvg is cast to fp32 before lepe

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        norm_eps: float = 0.0,
        rope: bool = True,
        rope_base: float = 10000.0,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias, rope, rope_base, backend)
        self.norm_eps = check_float("norm_eps", norm_eps, min=0.0)

    def query_features(self, q: Tensor) -> Tensor:
        """fp32 ``[B, N, H, d]`` q → φq ``[B, N, H, 2, d]`` (positive half, negative half)."""
        n = torch.linalg.vector_norm(q, dim=-1, keepdim=True)
        if self.norm_eps:
            n = n.clamp_min(self.norm_eps)
        power = (3.0 * (0.5 + torch.tanh(n))).unsqueeze(-1)  # (B, N, H, 1, 1)
        return (torch.stack((F.relu(q), F.relu(-q)), dim=-2) / n.unsqueeze(-1)) ** power

    @staticmethod
    def key_features(k: Tensor) -> Tensor:
        """fp32 ``[B, N, H, d]`` k → φk ``[B, N, H, 2, d]``."""
        k = k**3
        return torch.stack((F.relu(k), F.relu(-k)), dim=-2)

    def features(self, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """fp32 ``[B, N, H, d]`` q, k → φq, φk as ``[B, N, H, 2, d]`` (positive half, negative half)."""
        return self.query_features(q), self.key_features(k)

    def attend(self, q, k, v, hw, num_prefix_tokens, output=None):
        return self.attend_rows(lambda a, b: q[:, a:b], lambda a, b: k[:, a:b], v, hw, num_prefix_tokens, output)

    def attend_rows(self, q, k, v, hw, num_prefix_tokens, output=None, **out):
        # Features chunk by chunk of tokens (linear_attention_streamed): never a full [B, N, H, 2d] temporary.
        if self.rope:
            sin, cos = self.rope_tables(hw, num_prefix_tokens, v.device, v.dtype)
            sin, cos = sin.unsqueeze(-2), cos.unsqueeze(-2)  # (N, 1, 1, r) over [B, N, H, 2, d]

        def mapped(phi: Tensor, a: int, b: int) -> Tuple[Tensor, Optional[Tensor]]:
            if not self.rope:
                return phi.flatten(-2), None
            return apply_rope(phi, sin[a:b], cos[a:b]).flatten(-2), phi.flatten(-2)  # RoPE in the numerator only

        return linear_attention_streamed(
            lambda a, b: mapped(self.query_features(q(a, b)), a, b),
            lambda a, b: mapped(self.key_features(k(a, b)), a, b),
            v, v.shape[1], mean=True, eps=NALA_EPS, output=output, backend=self.backend, **out,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_eps={self.norm_eps:g}"


class VanillaSelfAttention(_NaLaWrapper):
    """NaLaFormer's softmax attention (stages 3–4): ``softmax(RoPE(q)·RoPE(k)ᵀ/√d) v`` in the NaLa wrapper.

    ``x (B, N, C) → (B, N, C)``; quadratic in ``N``. Same options and prefix-token rule as
    :class:`NormAwareLinearAttn` (``backend`` is accepted for a uniform interface; SDPA is used).
    Follows ``NALA.py::VanillaSelfAttention``; deviations as listed in the module docstring.
    """

    linear_cost = False

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        rope: bool = True,
        rope_base: float = 10000.0,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias, rope, rope_base, backend)

    def attend(self, q, k, v, hw, num_prefix_tokens, output=None):
        if self.rope:
            sin, cos = self.rope_tables(hw, num_prefix_tokens, q.device, q.dtype)
            q, k = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        if output is None:
            return o
        return map_token_ranges(lambda a, b: output(a, b, o[:, a:b]), o.shape[0], o.shape[1], self.dim)


__all__ = ["NormAwareLinearAttn", "VanillaSelfAttention", "apply_rope", "rope_2d", "rope_angles", "rotate_pairs"]

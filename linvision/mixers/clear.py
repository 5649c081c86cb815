"""CLEAR: circular-window local softmax attention, with global prefix tokens and optional pooled tokens.

Paper: "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up" (Songhua Liu, Zhenxiong Tan,
Xinchao Wang; arXiv 2412.16112, NeurIPS 2025). Official code followed, read at commit
98e9fed2b8a776a043a0421100db9831879de784 of ``Huage001/CLEAR``:

- ``attention_processor.py::init_local_mask_flex`` / ``::init_local_downsample_mask_flex`` (the support)
  → :func:`linvision.kernels.window_attn.window_attention` / ``window_mask``
- ``attention_processor.py::LocalFlexAttnProcessor`` / ``::LocalDownsampleFlexAttnProcessor`` (pooling
  with ``spatial_weight``, proportional-attention scale) → :func:`clear_attention`, :func:`clear_scale`,
  :class:`ClearAttention` (``"clear"``)
- ``transformer_flux.py::FluxPosEmbed`` (``ntk_factor``) → :func:`rope_tables` (``rope=True``)

Operator (``T`` prefix tokens first, then ``h×w`` image tokens in raster order, per head)::

    q, k, v   = split(qkv(x))                              each (B, N, H, d)
    q, k      = RoPE(q), RoPE(k)                           optional (rope=True); prefix tokens unrotated
    k_ds, v_ds = Σ_{a,c<f} w[a,c] · k/v[(i·f+a, j·f+c)]    optional (pool_factor=f), after RoPE; w init 1/f²
    o_i       = softmax_j(s · q_i·k_j) v_j  over j ∈ S(i)
    S(image query at (y, x)) = prefix ∪ {image (y', x'): (y−y')² + (x−x')² < r²} ∪ pooled
    S(prefix query)          = prefix ∪ image              (not the pooled tokens)
    out       = proj(o)

Scale ``s``: ``d^-½``; with proportional attention (``train_seq_len`` given, FLUX: ``64² + 512 = 4608``)
``s = √(log_{train_seq_len}(N_kv) / d)`` with ``N_kv = T + h·w`` (before the pooled tokens), and with
pooled tokens ``√(log_{train_seq_len}(10·N_kv) / d)``: the official down-sample processor's factor 10,
reproduced by default (``pooled_log_factor=10``; 1 is the fix, the teacher's formula).

Cost per image token ``O((πr² + T + P)·d)`` with ``P = hw/f²`` pooled tokens: linear in the image for
``f = None``. The attention core is :func:`linvision.kernels.window_attn.window_attention` (Triton on
CUDA; a blocked PyTorch reference elsewhere), which a diffusers FLUX processor calls the same way with
the 512 text tokens as prefix tokens (see :func:`clear_attention`).

Deviations from the official code:

- Geometry per call: the official code builds a FlexAttention ``BlockMask`` once into module globals
  (``BLOCK_MASK``, ``HEIGHT``, ``WIDTH``) and compiles processors for it, so a new resolution needs new
  processors. Here ``hw`` is an argument of every call (no output change; quirk policy: fix).
- The text length is ``num_prefix_tokens``, not the hard-coded 512 of the official pooling slice
  (``key[:, :, 512:]``) and masks: identical for ``T = 512``, correct for any other ``T``.
- A dedicated sparse kernel instead of FlexAttention: same support and outputs up to rounding.
- As a vision mixer it owns timm-style fused ``qkv`` and ``proj`` linears (so a softmax ViT's weights
  load as they are, CLEAR's initialisation from the teacher) instead of FLUX's ``to_q/k/v``, QK RMSNorm,
  ``add_*`` text projections and ``to_out``; those belong to the FLUX processor (a later integration).
- RoPE is optional (``rope=False`` by default: a timm ViT has absolute position embeddings and no RoPE).
  With ``rope=True`` it is FLUX's axial form (``theta=10000``, frequencies ``θ^(−2i/d_axis)``,
  interleaved pairs, ``ntk_factor`` multiplying θ) on two axes (row, column), each of
  ``2·(d // 4)`` dims (FLUX.1 uses (16, 56, 56) over (text id, row, column)); prefix tokens get position 0,
  the identity, as FLUX's all-zero text ids; dims beyond ``4·(d // 4)`` are not rotated.
- Default ``radius=8`` (the official CLI default is 16 for 64×64 FLUX latents; 8 is the smallest published
  radius, ``clear_local_8``): at most 193 image keys per query, so the cost per token stays bounded at any
  resolution while a 14×14 ViT grid is still covered almost globally.
- ``pool_factor=None`` (or 1, as the official ``--down_factor 1`` selects the processor without
  pooling) disables the pooled tokens. ``h`` and ``w`` must be multiples of ``f`` (``ValueError``).
- ``spatial_weight`` keeps the official shape ``(1, 1, 1, f, 1, f, 1)`` (rows ``a``, columns ``c``), so the
  published tensors load as they are.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.validation import check_bool, check_float, check_int, check_optional
from ..kernels.window_attn import pool_tokens, window_attention
from .base import QKVMixer
from .rotary import Rotation

FLUX_TRAIN_SEQ_LEN = 64**2 + 512  # official train_seq_len: 1024 px → 64×64 latent tokens + 512 text tokens
FLUX_RADIUS = 16  # official distill.py --window_size default
POOLED_LOG_FACTOR = 10.0  # official LocalDownsampleFlexAttnProcessor: log(10·N) under proportional attention
ROPE_THETA = 10000.0  # FluxPosEmbed(theta=10000)


def clear_scale(
    head_dim: int,
    num_kv: int,
    train_seq_len: Optional[int] = None,
    pooled: bool = False,
    pooled_log_factor: float = POOLED_LOG_FACTOR,
) -> float:
    """CLEAR's softmax scale: ``d^-½``, or proportional attention ``√(log_L(c·N_kv)/d)`` when ``train_seq_len=L``.

    ``N_kv``: prefix + image tokens, *before* the pooled tokens; ``c = pooled_log_factor`` when pooled
    tokens are used (official: 10), else 1.
    """
    if train_seq_len is None:
        return math.sqrt(1 / head_dim)  # the official expression (bitwise: it can differ from 1/√d in the last ulp)
    factor = pooled_log_factor if pooled else 1.0
    return math.sqrt(math.log(factor * num_kv) / math.log(train_seq_len) / head_dim)


def pooling_weight(pool_factor: Optional[int]) -> Optional[nn.Parameter]:
    """The learnable ``spatial_weight (1, 1, 1, f, 1, f, 1)`` of the pooled tokens, initialised to ``1/f²``
    (the official shape); None without pooling (``pool_factor`` None)."""
    if pool_factor is None:
        return None
    f = pool_factor
    return nn.Parameter(torch.full((1, 1, 1, f, 1, f, 1), 1.0 / (f * f)))


def clear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hw: Tuple[int, int],
    *,
    radius: int,
    num_prefix_tokens: int = 0,
    pool_factor: Optional[int] = None,
    spatial_weight: Optional[Tensor] = None,
    scale: Optional[float] = None,
    output: Optional[Callable[[int, int, Tensor], Tensor]] = None,
    backend: str = "auto",
) -> Tensor:
    """CLEAR's attention after projections and RoPE: pooled tokens (if ``pool_factor``), then window attention.

    ``q, k, v [B, T + h·w, H, d]`` (prefix/text tokens first, as in FLUX's joint ``[text; image]``).
    ``spatial_weight``: ``f²`` pooling weights (official shape ``(1, 1, 1, f, 1, f, 1)``), default ``1/f²``.
    The pooled tokens are built from the (rotated) keys and the values of the image tokens only.
    ``output(a, b, o)``: a token-wise epilogue of the output rows ``a:b`` (see
    :func:`linvision.kernels.window_attn.window_attention`); the attention output is then never held whole.
    """
    pooled_k = pooled_v = None
    if pool_factor is not None and pool_factor != 1:
        pooled_k = pool_tokens(k, hw, pool_factor, spatial_weight, num_prefix_tokens)
        pooled_v = pool_tokens(v, hw, pool_factor, spatial_weight, num_prefix_tokens)
    return window_attention(
        q, k, v, hw, radius=radius, num_prefix_tokens=num_prefix_tokens,
        pooled_k=pooled_k, pooled_v=pooled_v, scale=scale, output=output, backend=backend,
    )


def rope_tables(
    head_dim: int,
    hw: Tuple[int, int],
    num_prefix_tokens: int = 0,
    theta: float = ROPE_THETA,
    ntk_factor: float = 1.0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """FLUX-style axial RoPE ``(cos, sin)``, each ``(T + h·w, 4·(d // 4))`` in ``dtype``.

    Per axis (row, then column) of ``a = 2·(d // 4)`` dims: ``freq_i = 1 / (θ·ntk)^(2i/a)``, angle
    ``pos·freq_i`` repeated for the pair ``(2i, 2i+1)`` (diffusers ``get_1d_rotary_pos_embed`` with
    ``repeat_interleave_real=True``; angles in fp64 as there). Prefix tokens: position 0.
    """
    h, w = hw
    a = 2 * (head_dim // 4)
    freqs = 1.0 / ((theta * ntk_factor) ** (torch.arange(0, a, 2, dtype=torch.float64, device=device) / a))
    rows = torch.arange(h, dtype=torch.float64, device=device)[:, None] * freqs  # (h, a/2)
    cols = torch.arange(w, dtype=torch.float64, device=device)[:, None] * freqs  # (w, a/2)
    ang = torch.cat(
        (rows[:, None].expand(h, w, a // 2).repeat_interleave(2, -1), cols[None].expand(h, w, a // 2).repeat_interleave(2, -1)),
        dim=-1,
    ).reshape(h * w, 2 * a)
    if num_prefix_tokens:
        ang = torch.cat((ang.new_zeros(num_prefix_tokens, 2 * a), ang), 0)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """diffusers ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` on the first ``cos.shape[-1]`` dims.

    ``x [B, N, H, d]``; ``cos, sin (N, r)``; pairs ``(x₀, x₁) → (x₀cos − x₁sin, x₁cos + x₀sin)``, in fp32
    (fp64 for fp64 ``x``).
    """
    r = cos.shape[-1]
    if r == 0:
        return x
    head = x[..., :r].to(accumulation_dtype(x.dtype))
    cos, sin = cos.to(head.dtype), sin.to(head.dtype)
    re, im = head.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-im, re), -1).flatten(-2)
    out = (head * cos[:, None] + rotated * sin[:, None]).to(x.dtype)
    return out if r == x.shape[-1] else torch.cat((out, x[..., r:]), -1)


class ClearAttention(QKVMixer):
    """CLEAR's circular-window softmax attention as a vision token mixer (see the module docstring).

    Options:

    - ``radius`` (default 8): image keys with ``dy² + dx² < radius²`` (FLUX checkpoints: 8, 16, 32).
    - ``pool_factor`` (default None = off): ``f×f`` learnably weighted pooled K/V tokens, seen by every
      image query; parameter ``spatial_weight`` initialised to ``1/f²``. ``h, w`` must be multiples of f.
    - ``rope`` (default False), ``rope_theta``, ``rope_ntk_factor``: FLUX-style 2-D axial RoPE on q, k.
    - ``train_seq_len`` (default None = scale ``d^-½``): proportional attention for that training token
      count (FLUX: :data:`FLUX_TRAIN_SEQ_LEN`); ``pooled_log_factor`` (default 10, official) inside the log
      when pooling is on; 1 is the fix.
    - ``qkv_bias``, ``proj_bias``, ``backend`` (``"auto" | "torch" | "triton"``).

    Prefix tokens (class / register / text) are global in both directions (CLEAR's text-token rule) and
    do not see the pooled tokens.

    A teacher's RoPE (``mix(..., rope=Rotation)``, from ``linvision.timm.linearize`` of an EVA02 / RoPE ViT)
    rotates q and k of the image tokens as the teacher does, in place of the FLUX-style ``rope=True``
    (both at once: ``ValueError``); a teacher's q/k norms (:meth:`carry_qk_norm`) come first, as there.
    """

    supports_rope = True
    supports_qk_norm = True
    joint_attention = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        radius: int = 8,
        pool_factor: Optional[int] = None,
        rope: bool = False,
        rope_theta: float = ROPE_THETA,
        rope_ntk_factor: float = 1.0,
        train_seq_len: Optional[int] = None,
        pooled_log_factor: float = POOLED_LOG_FACTOR,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        self.radius = check_int("radius", radius, min=1)
        pool_factor = check_optional(check_int, "pool_factor", pool_factor, min=1)
        self.pool_factor = None if pool_factor == 1 else pool_factor
        self.rope = check_bool("rope", rope)
        self.rope_theta = check_float("rope_theta", rope_theta, min=1.0, min_open=True)
        self.rope_ntk_factor = check_float("rope_ntk_factor", rope_ntk_factor, min=0.0, min_open=True)
        self.train_seq_len = check_optional(check_int, "train_seq_len", train_seq_len, min=2)
        self.pooled_log_factor = check_float("pooled_log_factor", pooled_log_factor, min=0.0, min_open=True)
        self.backend = check_backend(backend)
        self.register_parameter("spatial_weight", pooling_weight(self.pool_factor))

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, rope: Optional[Rotation] = None) -> Tensor:
        h, w = hw
        T = num_prefix_tokens
        f = self.pool_factor
        if f is not None and (h % f or w % f):
            raise ValueError(f"pool_factor={f} must divide the grid hw={h}x{w}")
        q, k, v = self.project_qkv(x)
        if rope is not None:
            if self.rope:
                raise ValueError("clear(rope=True) has its own RoPE: a teacher's RoPE replaces it (use rope=False)")
            q, k = rope.apply(q, T), rope.apply(k, T)
        elif self.rope:
            acc = accumulation_dtype(x.dtype)
            cos, sin = rope_tables(self.head_dim, hw, T, self.rope_theta, self.rope_ntk_factor, x.device, acc)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = clear_scale(self.head_dim, T + h * w, self.train_seq_len, f is not None, self.pooled_log_factor)
        # the projection as the kernel's epilogue, per band of output rows: the attention output is never held whole
        return clear_attention(
            q, k, v, hw, radius=self.radius, num_prefix_tokens=T, pool_factor=f, spatial_weight=self.spatial_weight,
            scale=scale, output=lambda a, b, o: self.proj(o.flatten(2)), backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = f"{super().extra_repr()}, radius={self.radius}, pool_factor={self.pool_factor}, rope={self.rope}"
        if self.train_seq_len is not None:
            s += f", train_seq_len={self.train_seq_len}"
        return s


__all__ = [
    "ClearAttention",
    "FLUX_RADIUS",
    "FLUX_TRAIN_SEQ_LEN",
    "apply_rope",
    "clear_attention",
    "clear_scale",
    "pooling_weight",
    "rope_tables",
]

"""LINA: division-normalised ReLU linear attention with a depth-wise conv branch and a per-position KV gate.

Paper: "LINA" (Wang et al., arXiv 2601.22630), a NOVA/MAR-style masked-autoregressive generator whose
attentions are all bidirectional linear attentions.
Official files (``techmonsterwang/LINA`` @f13f7c39066a1a60d025a5440bdb8d9304772862):

- ``diffnext/models/vision_transformer_linear_decouple1_kvscale1.py::LinearAttentionDecoder`` (the paper's
  LINA: division + DWC + KV gate) and ``::LinearAttentionEncoder`` (division only), ``::Block``;
- ``diffnext/models/vision_transformer_linear_decouple1.py::LinearAttentionDecoder`` (division + DWC);
- ``diffnext/models/vision_transformer_linear9.py::Attention`` (subtraction / InLine baseline).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.validation import (
    check_bool,
    check_choice,
    check_float,
    check_hw,
    check_int,
    check_odd_int,
    check_optional,
)
from .base import QKVMixer
from .token_conv import depthwise_conv_tokens
from .inherit import copy_qkv_proj, fuse_q_kv_state_dict, softmax_attention_weights

NORMALIZATIONS = ("div", "sub")
GATE_RESIZE = ("strict", "interpolate")


class LinaAttention(QKVMixer):
    """LINA attention: ``y = [LN](proj(LinAttn(φQ, g_k⊙φK, g_v⊙V) + DWC(x)))``.

    Shapes: ``x (B, N, C)`` with ``N = P + h·w`` (``P = num_prefix_tokens``: LINA's condition tokens,
    first; image tokens in raster order) → ``y (B, N, C)``; ``H = num_heads`` heads of ``d = C/H``.
    Projections: fused ``qkv`` Linear(C, 3C) (bias ``qkv_bias``) and ``proj`` Linear(C, C), the official
    names of the paper's files.

    ``normalization="div"`` (default, the paper's): ``φ(u) = ReLU(u) + 1e-6``; per head
    ``S = (φKᵀ N^-½)(V N^-½)`` [d, d], ``O = φQ S / (φQ · mean_N φK + eps)`` [N, d], ``eps = 1e-6`` on the
    mean. ``normalization="sub"`` (InLine, ``vision_transformer_linear9.py``): ``φ = ReLU`` with no offset,
    ``s = d^-½``, ``O = s·φQ S + (1 − s·φQ·mean_N φK)·mean_N V``: the weights sum to one with no division.
    Both run in fp32 through :func:`linvision.kernels.linear_attn` (``mean=True``).

    Options:

    - ``dwc=True``: ``Conv2d(C, C, 5, padding=2, groups=C)`` (per-channel, with bias; name ``dw_conv``) on
      the **block input x** of the image tokens on the ``(h, w)`` grid, zero for the prefix tokens, added to
      the concatenated heads before ``proj``. Official decoder blocks have it, encoder blocks do not.
    - ``kv_gate=False``: the KV gate, parameters ``key_scale`` and ``value_scale`` of shape
      ``(1, H, gate_tokens, 1)`` (init 1; official ``gate_tokens=320`` = 64 condition + 16×16 image tokens),
      one weight per head and **absolute token position**: ``φK ← key_scale ⊙ φK`` (numerator and the
      denominator's mean), ``V ← value_scale ⊙ V``. ``gate_resize`` picks how a call with another layout
      is handled:

      - ``"strict"`` (default, the official behaviour): the gate is used per position as stored and the
        call must have ``N == gate_tokens`` tokens, else ``ValueError`` (the official code asserts N == 320).
      - ``"interpolate"`` (project extension, not in the official code): the stored gate is read as
        ``gate_prefix_tokens`` prefix positions followed by an ``gate_grid = (h0, w0)`` raster grid
        (default ``h0 = w0 = √(gate_tokens − gate_prefix_tokens)``, which must then be a perfect square).
        The call must have exactly ``gate_prefix_tokens`` prefix tokens (``ValueError`` otherwise); their
        gate entries are used per position unchanged. The grid part of each head's key and value gate is
        resampled to the call's ``(h, w)`` by ``F.interpolate(mode="bilinear", align_corners=False,
        antialias=False)`` in fp32 (an exact identity when ``(h, w) == (h0, w0)``, so the trained size
        reproduces ``"strict"``). Gradients flow back to the stored gate.
    - ``post_norm=False``: apply ``LayerNorm(C)`` (module ``norm``) to the output. In NOVA/LINA the block is
      ``x = x + LN1(Attn(x)); x = x + LN2(MLP(x))`` (post-branch LayerNorm, no pre-norm); the LN belongs
      to the block (``blocks.i.norm1``), so enable this only when the surrounding block does not have it.
    - ``eps`` (``"div"`` only; default 1e-6), ``dwc_kernel_size`` (5), ``qkv_bias``/``proj_bias`` (True),
      ``backend`` (kernel backend).

    Official configurations: encoder ``dwc=False``; ``decouple1`` decoder = the defaults; the paper's
    ``decouple1_kvscale1`` decoder = ``kv_gate=True`` (``gate_tokens=320, gate_prefix_tokens=64`` for c2i
    at 256 px); ``linear9`` = ``normalization="sub", dwc=False``. The defaults leave the gate off so the
    mixer works at any resolution out of the box.

    Deviations from the official code:

    - The DWC grid is ``hw`` and the prefix count is ``num_prefix_tokens`` from the call (the official code
      hard-codes 64 condition tokens and a 16×16 grid); identical at the official layout.
    - ``gate_resize="interpolate"`` (above) is a project extension; the official code has only the fixed
      gate.
    - φ is evaluated in fp32 inside the kernel (official: ``ReLU(u) + 1e-6`` in the input dtype, then cast to
      fp32); the core is fp32 in both. In bf16 the official ``+1e-6`` is lost on non-zero entries; here it
      is kept: a rounding-level difference.
    - ``sub`` combined with ``dwc`` or ``kv_gate`` is allowed (the official subtraction file has neither);
      the gate then weights φK and V as in ``div``.
    - Split ``q``/``kv`` checkpoints (``linear9``) load into ``qkv`` via :func:`fuse_q_kv_state_dict`.
    - The unguarded gate is reproduced: a negative ``key_scale`` can make the ``div`` denominator cross zero.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        normalization: str = "div",
        eps: Optional[float] = None,
        dwc: bool = True,
        dwc_kernel_size: int = 5,
        kv_gate: bool = False,
        gate_tokens: int = 320,
        gate_prefix_tokens: int = 64,
        gate_grid: Optional[Tuple[int, int]] = None,
        gate_resize: str = "strict",
        post_norm: bool = False,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        eps = check_optional(check_float, "eps", eps, min=0.0)
        if eps is not None and normalization != "div":
            raise ValueError("eps applies to normalization='div' only (the subtraction form has no denominator)")
        eps = 1e-6 if eps is None else eps
        dwc = check_bool("dwc", dwc)
        dwc_kernel_size = check_odd_int("dwc_kernel_size", dwc_kernel_size)
        kv_gate = check_bool("kv_gate", kv_gate)
        gate_tokens = check_int("gate_tokens", gate_tokens, min=1)
        gate_prefix_tokens = check_int("gate_prefix_tokens", gate_prefix_tokens, min=0, max=gate_tokens - 1)
        gate_resize = check_choice("gate_resize", gate_resize, GATE_RESIZE)
        post_norm = check_bool("post_norm", post_norm)
        backend = check_backend(backend)
        if gate_grid is not None:
            check_hw(gate_grid, name="gate_grid")  # its product is checked against the gate below
        self.normalization = normalization
        self.eps = float(eps)
        self.feature_offset = 1e-6 if normalization == "div" else 0.0
        self.scale = self.head_dim ** -0.5 if normalization == "sub" else None
        self.backend = backend
        self.gate_resize = gate_resize
        self.gate_tokens = gate_tokens
        self.gate_prefix_tokens = gate_prefix_tokens
        self.gate_grid = (
            self._resolve_gate_grid(gate_grid)
            if kv_gate and (gate_resize == "interpolate" or gate_grid is not None)
            else None
        )
        self.dw_conv = (
            nn.Conv2d(dim, dim, dwc_kernel_size, padding=dwc_kernel_size // 2, groups=dim) if dwc else None
        )
        if kv_gate:
            self.key_scale = nn.Parameter(torch.ones(1, num_heads, self.gate_tokens, 1))
            self.value_scale = nn.Parameter(torch.ones(1, num_heads, self.gate_tokens, 1))
        else:
            self.key_scale = self.value_scale = None
        self.norm = nn.LayerNorm(dim) if post_norm else None
        self.register_load_state_dict_pre_hook(fuse_q_kv_state_dict)

    def _resolve_gate_grid(self, gate_grid: Optional[Tuple[int, int]]) -> Tuple[int, int]:
        cells = self.gate_tokens - self.gate_prefix_tokens
        if gate_grid is None:
            side = math.isqrt(cells)
            if side * side != cells:
                raise ValueError(
                    f"gate_tokens - gate_prefix_tokens = {cells} is not a perfect square; pass gate_grid=(h0, w0)"
                )
            return side, side
        h0, w0 = check_hw(gate_grid, name="gate_grid")
        if h0 * w0 != cells:
            raise ValueError(f"gate_grid {gate_grid!r} must have h0*w0 = gate_tokens - gate_prefix_tokens = {cells}")
        return h0, w0

    @property
    def kv_gate(self) -> bool:
        return self.key_scale is not None

    def kv_gate_weights(self, hw: Tuple[int, int], num_prefix_tokens: int) -> Tuple[Tensor, Tensor]:
        """The key and value gates for a call, each ``(N, H)`` with ``N = num_prefix_tokens + h·w``.

        ``"strict"``: the stored gate as is (``N`` must equal ``gate_tokens``). ``"interpolate"``: the
        stored prefix entries, then the grid part resampled bilinearly to ``hw`` (see the class docstring).
        """
        h, w = hw
        n = num_prefix_tokens + h * w
        if self.gate_resize == "strict":
            if n != self.gate_tokens:
                raise ValueError(
                    f"LINA's KV gate has one weight per absolute position for gate_tokens={self.gate_tokens} tokens; "
                    f"got N={n} (hw={h}x{w}, {num_prefix_tokens} prefix tokens). Use gate_resize='interpolate' "
                    "to resample it to other resolutions"
                )
            return self.key_scale[0, :, :, 0].t(), self.value_scale[0, :, :, 0].t()
        if num_prefix_tokens != self.gate_prefix_tokens:
            raise ValueError(
                f"gate_resize='interpolate' keeps the {self.gate_prefix_tokens} prefix gate entries per position; "
                f"the call has {num_prefix_tokens} prefix tokens"
            )
        h0, w0 = self.gate_grid
        p0, heads = self.gate_prefix_tokens, self.num_heads
        gates = torch.cat([self.key_scale, self.value_scale], dim=1)[..., 0]  # (1, 2H, T)
        gates = gates.to(accumulation_dtype(gates.dtype))  # fp32 (fp64 in an fp64 module)
        prefix, grid = gates[..., :p0], gates[..., p0:].reshape(1, 2 * heads, h0, w0)
        if (h, w) != (h0, w0):
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        gates = torch.cat([prefix, grid.flatten(2)], dim=-1)[0].t()  # (N, 2H)
        return gates[:, :heads], gates[:, heads:]

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        q, k, v = self.qkv_rows(x)  # projected per range of tokens: no full-size q, k, v
        k_weight = v_weight = None
        if self.kv_gate:
            k_weight, v_weight = self.kv_gate_weights(hw, num_prefix_tokens)

        def output(a: int, b: int, o: Tensor) -> Tensor:  # token-wise, in chunks of tokens: cache-sized temporaries
            o = o.flatten(2)
            if self.dw_conv is not None:
                o = o + self.local_term(x, hw, num_prefix_tokens, a, b)
            y = self.proj(o)
            return y if self.norm is None else self.norm(y)

        return linear_attention_streamed(
            lambda a, b: (q(a, b), None), lambda a, b: (k(a, b), None), v, x.shape[1], num_keys=x.shape[1],
            k_weight=k_weight, v_weight=v_weight, normalize=self.normalization, mean=True, eps=self.eps,
            scale=self.scale, feature_map="relu", feature_offset=self.feature_offset, output=output,
            backend=self.backend,
        )

    def local_term(
        self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, start: int = 0, stop: Optional[int] = None
    ) -> Tensor:
        """DWC of the block input over the image grid for tokens ``start:stop``: ``x (B, N, C)`` →
        ``(B, stop − start, C)``, zeros on the prefix. Only the grid rows around the range are convolved."""
        return depthwise_conv_tokens(x, hw, num_prefix_tokens, self.dw_conv.weight, self.dw_conv.bias, start, stop)

    @classmethod
    def from_softmax(cls, attn: nn.Module, *, copy_weights: bool = True, **options) -> "LinaAttention":
        """A LINA mixer with the ``qkv``/``proj`` of a softmax attention (linvision, timm or diffusers layout).

        ``dim``, ``num_heads`` and the bias flags are read from ``attn`` (``num_heads`` may be overridden:
        a fused ``qkv`` weight does not depend on the head split); ``copy_weights=False`` keeps PyTorch's
        default init. DWC, gates and norm are always new. Other ``options`` go to the constructor.
        """
        check_bool("copy_weights", copy_weights)
        src = softmax_attention_weights(attn)
        for key in ("dim", "qkv_bias", "proj_bias"):
            if key in options:
                raise ValueError(f"{key} is read from the softmax attention; do not pass it")
        options.setdefault("num_heads", src.num_heads)
        mixer = cls(dim=src.dim, qkv_bias=src.qkv_bias is not None, proj_bias=src.proj_bias is not None, **options)
        copy_qkv_proj(mixer, src, "qkv+proj" if copy_weights else "none")
        return mixer.to(device=src.qkv_weight.device, dtype=src.qkv_weight.dtype)

    def extra_repr(self) -> str:
        parts = [super().extra_repr(), f"normalization={self.normalization!r}"]
        if self.normalization == "div":
            parts.append(f"eps={self.eps}")
        parts.append(f"dwc={self.dw_conv is not None}")
        if self.kv_gate:
            parts.append(f"gate_tokens={self.gate_tokens}, gate_resize={self.gate_resize!r}")
        parts.append(f"post_norm={self.norm is not None}")
        return ", ".join(parts)


__all__ = ["LinaAttention"]

"""LiT: ReLU linear attention with a 5×5 depth-wise convolution on V, and weight inheritance from softmax.

Paper: "LiT: Delving into a Simple(fied) Linear Diffusion Transformer for Image Generation",
Wang et al., arXiv 2501.12976. No official code is public, so every choice below is documented;
the numerics follow the first author's linear-attention idiom in
``techmonsterwang/LINA: diffnext/models/vision_transformer_linear_decouple1_kvscale1.py::LinearAttentionEncoder
@f13f7c39066a1a60d025a5440bdb8d9304772862`` (ReLU + 1e-6, mean form, ε = 1e-6, fp32 core), and the DWC
layout follows an unattributed public LiT-style ``LinearAttention`` (5×5 DWC on V with ``head_dim``
channels and ``groups=head_dim``, one filter bank shared by all heads, the FLatten-Transformer convention).

Weight inheritance from a softmax attention uses :mod:`linvision.mixers.inherit`.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from ..kernels.backend import check_backend
from ..kernels.linear_attn import linear_attention
from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.validation import check_bool, check_choice, check_float, check_odd_int
from .base import QKVMixer
from .token_chunks import reusable_output
from .token_conv import depthwise_conv_reach, depthwise_conv_tokens
from .inherit import copy_qkv_proj, fuse_q_kv_state_dict, softmax_attention_weights

FEATURE_OFFSET = 1e-6  # φ(u) = ReLU(u) + 1e-6
INHERIT_MODES = ("qkv+proj", "proj", "none")


def lit_dwc(dim: int, num_heads: int, kernel_size: int, shared_across_heads: bool) -> nn.Conv2d:
    """LiT's depth-wise convolution on V: ``Conv2d(d, d, k, groups=d)`` shared by the heads (``d = dim/num_heads``),
    or per channel ``Conv2d(C, C, k, groups=C)``; zero padding ``k // 2``, with bias, PyTorch's default init."""
    channels = dim // num_heads if shared_across_heads else dim
    return nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)


def lit_local_term(v: Tensor, hw: Tuple[int, int], dwc: nn.Conv2d, num_prefix_tokens: int = 0,
                   shared_across_heads: bool = True, start: int = 0, stop: Optional[int] = None) -> Tensor:
    """The DWC of V over the image grid for tokens ``start:stop``: ``v (B, T + h·w, H, d)`` →
    ``(B, stop − start, H·d)`` in ``dwc``'s dtype, zeros on the ``T`` prefix tokens (they are not on the grid).
    ``dwc`` from :func:`lit_dwc`; the shared bank is the per-channel conv with its filters repeated per head."""
    H = v.shape[2]
    weight, bias = dwc.weight, dwc.bias
    if shared_across_heads:
        weight, bias = weight.repeat(H, 1, 1, 1), bias.repeat(H)
    tokens = v.flatten(2).to(weight.dtype)
    return depthwise_conv_tokens(tokens, hw, num_prefix_tokens, weight, bias, start, stop)


def lit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hw: Tuple[int, int],
    dwc: nn.Conv2d,
    *,
    num_prefix_tokens: int = 0,
    dwc_shared_across_heads: bool = True,
    eps: float = 1e-6,
    backend: str = "auto",
) -> Tensor:
    """LiT's core after the projections: ``LinAttn(φq, φk, v) + DWC(v)``, ``φ(u) = ReLU(u) + 1e-6``, mean form.

    ``q, k, v [B, T + h·w, H, d]`` (``T`` prefix tokens first; in a joint DiT the text tokens) →
    ``(B, T + h·w, H·d)`` in ``q``'s dtype (the attention core in fp32). :class:`LiTAttention` and the joint
    text+image processor (:class:`linvision.diffusers.joint.LiTProcessor`) both call it.
    """
    o = linear_attention(
        q, k, v, mean=True, eps=eps, feature_map="relu", feature_offset=FEATURE_OFFSET, backend=backend
    ).flatten(2)
    return o + lit_local_term(v, hw, dwc, num_prefix_tokens, dwc_shared_across_heads).to(o.dtype)


class LiTAttention(QKVMixer):
    """LiT linear attention: ``y = proj(LinAttn(φQ, φK, V) + DWC(V))``.

    Shapes: ``x (B, N, C)`` with ``N = num_prefix_tokens + h·w`` (prefix tokens first, image tokens in
    raster order) → ``y (B, N, C)``; ``H = num_heads`` heads of ``d = C/H`` channels.

    Per head, with ``φ(u) = ReLU(u) + 1e-6``:

    - ``S = (φKᵀ N^-½)(V N^-½)``  [d, d],  ``z = φQ · mean_N(φK) + eps``  [N, 1],  ``O = φQ S / z``  [N, d]
      (eps is added to the *mean*, i.e. ``+eps·N`` relative to the sums). The core runs in fp32 through
      :func:`linvision.kernels.linear_attn` (``mean=True``); the output has the input dtype.
    - ``DWC``: a ``dwc_kernel_size``×``dwc_kernel_size`` depth-wise ``Conv2d`` (zero padding, with bias) on V
      of the image tokens reshaped to the ``(h, w)`` grid, added to the concatenated heads before ``proj``.

    Every token (prefix tokens included) joins the attention sums. Prefix tokens are not on the grid,
    so their DWC term is zero and their V does not enter the convolution.

    Options:

    - ``dwc_shared_across_heads=True`` (default): one ``Conv2d(d, d, k, groups=d)`` applied to each head's
      ``(B·H, d, h, w)`` slice: the layout of the LiT-style reference file (spec ``lit.md``: "default to the
      shared bank"). ``False``: per-channel ``Conv2d(C, C, k, groups=C)`` over ``(B, C, h, w)`` (LINA's
      DWC layout). The paper does not say which; the choice changes the parameter count
      (``d·(k²+1)`` versus ``C·(k²+1)``).
    - ``eps`` (1e-6), ``dwc_kernel_size`` (5, odd), ``qkv_bias``/``proj_bias`` (True, as DiT's attention),
      ``backend`` (kernel backend).
    - Few heads (guideline 2) is just ``num_heads``; :meth:`from_softmax` accepts a ``num_heads`` different
      from the teacher's, since a fused ``qkv`` weight does not depend on the head split.

    Deviations (no official code; all are choices):

    - Fused ``qkv`` Linear instead of the LiT-style file's ``q`` + ``kv`` (so DiT/timm weights load as they
      are); checkpoints with ``q.*``/``kv.*`` keys are fused on load (:func:`fuse_q_kv_state_dict`).
    - ``(h, w)`` comes from the call, never ``√N``: the reference's square-grid default crashes or
      reshapes wrongly on non-square grids; outputs on square grids are unchanged.
    - Prefix tokens (absent from LiT's DiT, which has no class token) get a zero DWC term.
    - φ and the core are evaluated in fp32 (the LiT-style file has no fp32 core; LINA's code forces one).
    """

    joint_attention = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        dwc_kernel_size: int = 5,
        dwc_shared_across_heads: bool = True,
        eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        self.dwc_kernel_size = check_odd_int("dwc_kernel_size", dwc_kernel_size)
        self.dwc_shared_across_heads = check_bool("dwc_shared_across_heads", dwc_shared_across_heads)
        self.eps = check_float("eps", eps, min=0.0)
        self.backend = check_backend(backend)
        self.dwc = lit_dwc(dim, num_heads, self.dwc_kernel_size, self.dwc_shared_across_heads)
        self.register_load_state_dict_pre_hook(fuse_q_kv_state_dict)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        q, k, v = self.qkv_rows(x)  # projected per range of tokens
        v = v(0, x.shape[1])  # whole: the DWC of a chunk reads the rows around it
        # token-wise, in chunks of tokens: the projections of each chunk, its outputs, the DWC of the rows around it
        # and the projection; cache-sized temporaries, and no full-size q, k, attention output or local term. The
        # outputs go into v's own buffer when it is one (each chunk once the later DWCs no longer read its rows).
        return linear_attention_streamed(
            lambda a, b: (q(a, b), None), lambda a, b: (k(a, b), None), v, x.shape[1], mean=True, eps=self.eps,
            feature_map="relu", feature_offset=FEATURE_OFFSET, backend=self.backend,
            output=lambda a, b, o: self.proj(o.flatten(2) + self.local_term(v, hw, num_prefix_tokens, a, b)),
            **reusable_output(v, x, depthwise_conv_reach(hw, self.dwc_kernel_size)),
        )

    def local_term(
        self, v: Tensor, hw: Tuple[int, int], num_prefix_tokens: int, start: int = 0, stop: Optional[int] = None
    ) -> Tensor:
        """DWC of V over the image grid for tokens ``start:stop``: ``v (B, N, H, d)`` → ``(B, stop − start, C)``,
        zeros on the prefix tokens (:func:`lit_local_term`)."""
        return lit_local_term(v, hw, self.dwc, num_prefix_tokens, self.dwc_shared_across_heads, start, stop)

    @classmethod
    def from_softmax(
        cls, attn: nn.Module, *, inherit: str = "qkv+proj", num_heads: Optional[int] = None, **options
    ) -> "LiTAttention":
        """A LiT mixer with the projections of a softmax attention (LiT's weight inheritance, guideline 3).

        ``attn``: a :class:`~linvision.mixers.softmax.SoftmaxAttention`, a ``timm`` ``Attention`` (both with
        fused ``qkv`` and ``proj``), or a diffusers ``Attention`` self-attention (``to_q/to_k/to_v`` fused
        into ``qkv``, ``to_out[0]`` → ``proj``). ``dim``, ``num_heads`` and the bias flags are read from it;
        ``num_heads`` may be overridden (fewer heads, guideline 2). Other ``options`` go to the constructor.

        ``inherit`` (default ``"qkv+proj"``: copy everything the two layouts share, exactly):

        - ``"qkv+proj"``: copy ``qkv`` and ``proj``;
        - ``"proj"``: the paper's guideline 4 ("load everything except attention": FID 54.80 without
          attention weights versus 55.29 with Q, K, V loaded): ``qkv`` keeps PyTorch's default init, ``proj``
          is copied (whether the paper counts ``proj`` as attention is unverified);
        - ``"none"``: copy nothing (shapes and bias flags only).

        The DWC is always new (PyTorch default init). The result is on ``attn``'s device and dtype.
        """
        check_choice("inherit", inherit, INHERIT_MODES)
        src = softmax_attention_weights(attn)
        for key in ("dim", "qkv_bias", "proj_bias"):
            if key in options:
                raise ValueError(f"{key} is read from the softmax attention; do not pass it")
        mixer = cls(
            dim=src.dim,
            num_heads=src.num_heads if num_heads is None else num_heads,
            qkv_bias=src.qkv_bias is not None,
            proj_bias=src.proj_bias is not None,
            **options,
        )
        copy_qkv_proj(mixer, src, inherit)
        return mixer.to(device=src.qkv_weight.device, dtype=src.qkv_weight.dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, eps={self.eps}, dwc_kernel_size={self.dwc_kernel_size}, "
            f"dwc_shared_across_heads={self.dwc_shared_across_heads}"
        )


__all__ = ["LiTAttention", "lit_attention", "lit_dwc", "lit_local_term"]

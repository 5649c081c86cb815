"""Joint text+image attention families (SD3, FLUX): text tokens are the mixer's prefix tokens.

A joint attention keeps the teacher's text projections (``add_q/k/v_proj``, ``to_add_out``), QK RMSNorms
and RoPE; the adapter owns the **image-stream** projections ``to_q/to_k/to_v/to_out`` (CLEAR fine-tunes
exactly these, initialised from the teacher) and a processor that replaces the softmax core:

- ``clear``: circular-window softmax over the image grid, text global both ways, optional pooled tokens
  (:func:`linvision.mixers.clear.clear_attention`; CLEAR's FLUX processor).
- ``lit``: LiT's normalised ReLU linear attention over all ``T + N`` tokens + 5×5 DWC on the image V.
- ``linfusion``: LinFusion's ELU+1 linear attention with residual feature MLPs on the projection inputs.

(``lit`` and ``linfusion`` on a joint DiT are project extensions: the papers apply them to DiT/PixArt
and SD UNets.) Installed, the adapter's ``to_q…`` sit at the teacher's names and its processor at
``attn.processor``, so the transformer's state dict shows CLEAR's published key layout
(``…attn.to_q.weight``, ``…attn.processor.spatial_weight``).

Token order inside the core is always ``[text; image]`` (FLUX's own; SD3 concatenates ``[image; text]``
and is reordered). Shapes: q, k, v ``[B, T + h·w, H, d]``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Type

import torch
from torch import Tensor, nn

from ..kernels.backend import check_backend
from ..kernels.validation import check_bool, check_float, check_odd_int
from ..mixers import TokenMixer, list_mixers, mixer_class
from ..mixers.clear import (FLUX_RADIUS, FLUX_TRAIN_SEQ_LEN, POOLED_LOG_FACTOR, ClearAttention, clear_attention,
                            clear_scale, pooling_weight)
from ..mixers.linfusion import LinFusionAttention, feature_mlp, linfusion_attention
from ..mixers.lit import LiTAttention, lit_attention, lit_dwc
from .geometry import LatentGeometry

# the mixers that declare joint_attention (the one registry decides which mechanisms exist)
JOINT_MECHANISMS = tuple(name for name in list_mixers() if mixer_class(name).joint_attention)
# what an installed joint adapter takes in a pipeline's joint_attention_kwargs: the per-call arguments of
# JointProcessor.__call__ and diffusers' own LoRA "scale" (consumed by the transformer before the processors)
JOINT_CALL_KWARGS = ("linvision_grid", "proportional_attention")
DIFFUSERS_CALL_KWARGS = ("scale",)


class JointProcessor(nn.Module):
    """Base processor: the teacher's joint attention with the softmax core replaced by :meth:`core`.

    Called as a diffusers processor ``(attn, hidden_states, encoder_hidden_states=None,
    attention_mask=None, image_rotary_emb=None)`` on an SD3 ``Attention`` or a ``FluxAttention``.
    ``geometry`` is set by the adapter at install time (the image grid of the current call);
    ``linvision_grid=(h, w)`` in ``joint_attention_kwargs`` overrides it for one call, and
    ``proportional_attention`` (a bool; CLEAR's per-call switch of the official notebook) is taken by the
    processors with a softmax scale (:attr:`takes_proportional_attention`) and refused by the others. No other
    keyword is accepted (the installed adapter also refuses unknown ``joint_attention_kwargs`` keys, which
    diffusers would otherwise drop with a warning).
    """

    takes_proportional_attention = False
    mixer: Type[TokenMixer]  # the mechanism served: its class in the registry, whose functional core runs here

    @classmethod
    def build(cls, dim: int, inner_dim: int, heads: int, **options) -> "JointProcessor":
        """The processor of a joint attention with ``dim`` input and ``inner_dim`` attention channels."""
        return cls(inner_dim, heads, **options)

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.geometry: Optional[LatentGeometry] = None

    # --- what a mechanism changes -------------------------------------------------------------------
    def feature_inputs(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """Inputs of ``to_q`` and ``to_k`` for the image stream (LinFusion adds its MLPs here)."""
        return x, x

    def core(self, q: Tensor, k: Tensor, v: Tensor, hw: Tuple[int, int], num_text: int,
             proportional_attention: Optional[bool] = None) -> Tensor:
        """``[B, T + h·w, H, d]`` → ``(B, T + h·w, H·d)``; ``proportional_attention`` only where
        :attr:`takes_proportional_attention` (None: the processor's own setting)."""
        raise NotImplementedError

    # --- the call -----------------------------------------------------------------------------------
    def _grid(self, num_tokens: int, num_text: Optional[int], grid=None) -> Tuple[Tuple[int, int], int]:
        if grid is not None:
            h, w = (int(s) for s in grid)
        elif self.geometry is None:
            raise RuntimeError("this joint processor is not installed (no geometry)")
        else:
            h, w = self.geometry.token_grid()
        if num_text is None:  # single-stream block: text is whatever is not image
            num_text = num_tokens - h * w
        if num_text < 0 or num_text + h * w != num_tokens:
            raise ValueError(
                f"a joint attention got {num_tokens} tokens, which is not {h}x{w} image tokens plus text tokens"
            )
        return (h, w), num_text

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        image_rotary_emb=None,
        linvision_grid: Optional[Tuple[int, int]] = None,
        proportional_attention: Optional[bool] = None,
    ):
        if attention_mask is not None:
            raise ValueError(f"{type(self).__name__} does not support attention masks")
        if proportional_attention is not None:
            if not self.takes_proportional_attention:
                raise ValueError(f"{type(self).__name__} has no softmax scale: proportional_attention applies to "
                                 "CLEAR only")
            if not isinstance(proportional_attention, bool):
                raise ValueError(f"proportional_attention must be a bool, got {proportional_attention!r}")
        if getattr(attn, "fused_projections", False):
            raise ValueError("fused QKV projections are not supported by linvision adapters; unfuse them first")
        from diffusers.models.transformers.transformer_flux import FluxAttention

        if isinstance(attn, FluxAttention):
            return self._flux(attn, hidden_states, encoder_hidden_states, image_rotary_emb, linvision_grid,
                              proportional_attention)
        return self._sd3(attn, hidden_states, encoder_hidden_states, linvision_grid, proportional_attention)

    def _image_qkv(self, attn: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        xq, xk = self.feature_inputs(x)
        head_dim = attn.to_q.out_features // attn.heads
        q = attn.to_q(xq).unflatten(-1, (-1, head_dim))
        k = attn.to_k(xk).unflatten(-1, (-1, head_dim))
        v = attn.to_v(x).unflatten(-1, (-1, head_dim))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        return q, k, v

    def _text_qkv(self, attn: nn.Module, e: Tensor, head_dim: int) -> Tuple[Tensor, Tensor, Tensor]:
        q = attn.add_q_proj(e).unflatten(-1, (-1, head_dim))
        k = attn.add_k_proj(e).unflatten(-1, (-1, head_dim))
        v = attn.add_v_proj(e).unflatten(-1, (-1, head_dim))
        if getattr(attn, "norm_added_q", None) is not None:
            q = attn.norm_added_q(q)
        if getattr(attn, "norm_added_k", None) is not None:
            k = attn.norm_added_k(k)
        return q, k, v

    def _flux(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb, grid=None, proportional=None):
        from diffusers.models.embeddings import apply_rotary_emb

        q, k, v = self._image_qkv(attn, hidden_states)
        num_text = None
        if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
            eq, ek, ev = self._text_qkv(attn, encoder_hidden_states, q.shape[-1])
            num_text = eq.shape[1]
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        hw, num_text = self._grid(q.shape[1], num_text, grid)
        out = self.core(q, k, v, hw, num_text, proportional).to(q.dtype)
        if encoder_hidden_states is not None:
            text, image = out.split_with_sizes([num_text, out.shape[1] - num_text], dim=1)
            image = attn.to_out[1](attn.to_out[0](image.contiguous()))
            return image, attn.to_add_out(text.contiguous())
        return out

    def _sd3(self, attn, hidden_states, encoder_hidden_states, grid=None, proportional=None):
        q, k, v = self._image_qkv(attn, hidden_states)
        num_text = 0
        if encoder_hidden_states is not None:
            eq, ek, ev = self._text_qkv(attn, encoder_hidden_states, q.shape[-1])
            num_text = eq.shape[1]
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        hw, num_text = self._grid(q.shape[1], num_text, grid)
        out = self.core(q, k, v, hw, num_text, proportional).to(q.dtype)
        text, image = out[:, :num_text], out[:, num_text:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


class ClearProcessor(JointProcessor):
    """CLEAR: image queries see text + a disc of radius ``radius`` (+ pooled tokens); text sees everything.

    ``pool_factor`` f (None/1 = off) adds ``spatial_weight (1,1,1,f,1,f,1)`` pooled K/V (init ``1/f²``);
    ``train_seq_len`` switches on proportional attention (FLUX: 4608); ``pooled_log_factor`` is the
    official 10 inside the log with pooling. Scale otherwise ``d^-½``.

    Per call, ``joint_attention_kwargs={"proportional_attention": True}`` (the official processors' call
    argument, used by CLEAR's high-resolution notebook) switches proportional attention on for that call with
    ``train_seq_len`` (the official ``64² + 512`` when none was given); ``False`` switches it off.
    """

    takes_proportional_attention = True
    mixer = ClearAttention

    def __init__(
        self,
        dim: int,
        heads: int,
        radius: int = FLUX_RADIUS,
        pool_factor: Optional[int] = None,
        train_seq_len: Optional[int] = None,
        pooled_log_factor: float = POOLED_LOG_FACTOR,
        backend: str = "auto",
    ):
        super().__init__(dim, heads)
        if isinstance(radius, bool) or int(radius) != radius or radius < 1:
            raise ValueError(f"radius must be an int >= 1, got {radius!r}")
        if pool_factor is not None and (isinstance(pool_factor, bool) or int(pool_factor) != pool_factor or pool_factor < 1):
            raise ValueError(f"pool_factor must be None or a positive int, got {pool_factor!r}")
        if train_seq_len is not None and (int(train_seq_len) != train_seq_len or train_seq_len < 2):
            raise ValueError(f"train_seq_len must be None or an int >= 2, got {train_seq_len!r}")
        self.radius = int(radius)
        self.pool_factor = None if pool_factor in (None, 1) else int(pool_factor)
        self.train_seq_len = None if train_seq_len is None else int(train_seq_len)
        self.pooled_log_factor = float(pooled_log_factor)
        self.backend = check_backend(backend)
        self.register_parameter("spatial_weight", pooling_weight(self.pool_factor))

    def core(self, q, k, v, hw, num_text, proportional_attention=None):
        h, w = hw
        f = self.pool_factor
        if f is not None and (h % f or w % f):
            raise ValueError(f"CLEAR pool_factor={f} must divide the image-token grid {h}x{w}")
        train_seq_len = self.train_seq_len
        if proportional_attention is not None:
            train_seq_len = (train_seq_len or FLUX_TRAIN_SEQ_LEN) if proportional_attention else None
        scale = clear_scale(q.shape[-1], num_text + h * w, train_seq_len, f is not None, self.pooled_log_factor)
        o = clear_attention(q, k, v, hw, radius=self.radius, num_prefix_tokens=num_text, pool_factor=f,
                            spatial_weight=self.spatial_weight, scale=scale, backend=self.backend)
        return o.flatten(2)

    def extra_repr(self) -> str:
        return f"radius={self.radius}, pool_factor={self.pool_factor}, train_seq_len={self.train_seq_len}"


class LiTProcessor(JointProcessor):
    """LiT core (:func:`linvision.mixers.lit.lit_attention`): normalised ReLU linear attention over text + image,
    plus the DWC of the image V (the text tokens are :class:`~linvision.mixers.lit.LiTAttention`'s prefix tokens)."""

    mixer = LiTAttention

    def __init__(
        self,
        dim: int,
        heads: int,
        dwc_kernel_size: int = 5,
        dwc_shared_across_heads: bool = True,
        eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__(dim, heads)
        kernel_size = check_odd_int("dwc_kernel_size", dwc_kernel_size)
        self.dwc_shared_across_heads = check_bool("dwc_shared_across_heads", dwc_shared_across_heads)
        self.eps = check_float("eps", eps, min=0.0)
        self.backend = check_backend(backend)
        self.dwc = lit_dwc(dim, heads, kernel_size, self.dwc_shared_across_heads)

    def core(self, q, k, v, hw, num_text, proportional_attention=None):
        return lit_attention(q, k, v, hw, self.dwc, num_prefix_tokens=num_text,
                             dwc_shared_across_heads=self.dwc_shared_across_heads, eps=self.eps, backend=self.backend)


class LinFusionProcessor(JointProcessor):
    """LinFusion core (:func:`linvision.mixers.linfusion.linfusion_attention`): ``q̂ = to_q(x + MLP_q(x))``,
    ``k̂ = to_k(x + MLP_k(x))``, ELU+1 normalised linear attention. The feature MLPs act on the ``dim`` inputs."""

    mixer = LinFusionAttention

    @classmethod
    def build(cls, dim: int, inner_dim: int, heads: int, **options) -> "LinFusionProcessor":
        return cls(dim, heads, **options)

    def __init__(self, dim: int, heads: int, projection_mid_dim: Optional[int] = None, eps: float = 1e-4,
                 backend: str = "auto"):
        super().__init__(dim, heads)
        self.eps = check_float("eps", eps, min=0.0)
        self.backend = check_backend(backend)
        self.projection_mid_dim = projection_mid_dim
        self.to_q_ = feature_mlp(dim, projection_mid_dim)
        self.to_k_ = feature_mlp(dim, projection_mid_dim)

    def feature_inputs(self, x):
        return x + self.to_q_(x), x + self.to_k_(x)

    def core(self, q, k, v, hw, num_text, proportional_attention=None):
        return linfusion_attention(q, k, v, eps=self.eps, backend=self.backend)


JOINT_PROCESSORS = (ClearProcessor, LiTProcessor, LinFusionProcessor)


def processor_class(mechanism: str) -> Type[JointProcessor]:
    """The joint processor of registered mixer ``mechanism``; ``ValueError`` for a mixer that does not declare
    ``joint_attention`` (or an unknown name)."""
    if mechanism not in JOINT_MECHANISMS:
        raise ValueError(
            f"mechanism {mechanism!r} does not fit a joint text+image attention; supported: {', '.join(JOINT_MECHANISMS)}"
        )
    cls = mixer_class(mechanism)
    return next(p for p in JOINT_PROCESSORS if p.mixer is cls)


class JointLayer(nn.Module):
    """The adapter's weights for one joint attention: image-stream ``to_q/to_k/to_v`` (Linear(dim, inner)),
    ``to_out`` (``[Linear(inner, dim), Dropout]``, absent for FLUX single blocks) and ``processor``.
    """

    def __init__(
        self,
        mechanism: str,
        dim: int,
        heads: int,
        inner_dim: Optional[int] = None,
        has_out: bool = True,
        qkv_bias: bool = True,
        out_bias: bool = True,
        **options,
    ):
        super().__init__()
        processor = processor_class(mechanism)
        inner_dim = dim if inner_dim is None else int(inner_dim)
        if inner_dim % heads:
            raise ValueError(f"inner_dim={inner_dim} must be a multiple of heads={heads}")
        self.to_q = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner_dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, dim, bias=out_bias), nn.Dropout(0.0)]) if has_out else None
        try:
            self.processor = processor.build(dim, inner_dim, heads, **options)
        except TypeError as e:
            raise ValueError(f"bad option for the joint {mechanism!r} processor: {e}") from None

    def swapped_names(self):
        return ("to_q", "to_k", "to_v") + (("to_out",) if self.to_out is not None else ())


def check_joint_attention_kwargs(kwargs: Optional[dict]) -> None:
    """``ValueError`` for a ``joint_attention_kwargs`` key no installed joint processor takes (diffusers would
    drop it with a warning: a switch such as a misspelt ``proportional_attention`` must not be ignored)."""
    unknown = sorted(set(kwargs or {}) - set(JOINT_CALL_KWARGS) - set(DIFFUSERS_CALL_KWARGS))
    if unknown:
        raise ValueError(f"joint_attention_kwargs {unknown} are not taken by the linvision adapter's processors; "
                         f"valid: {', '.join(JOINT_CALL_KWARGS + DIFFUSERS_CALL_KWARGS)}")


def joint_layout(attn: nn.Module) -> dict:
    """Constructor arguments of :class:`JointLayer` that match ``attn`` (an SD3 ``Attention``/``FluxAttention``)."""
    if getattr(attn, "fused_projections", False):
        raise ValueError("fused QKV projections are not supported by linvision adapters; unfuse them first")
    to_out = getattr(attn, "to_out", None)
    return {
        "dim": attn.to_q.in_features,
        "heads": int(attn.heads),
        "inner_dim": attn.to_q.out_features,
        "has_out": to_out is not None,
        "qkv_bias": attn.to_q.bias is not None,
        "out_bias": to_out is not None and to_out[0].bias is not None,
    }


@torch.no_grad()
def inherit_joint(layer: JointLayer, attn: nn.Module, mode: str) -> None:
    """Copy the teacher's image-stream projections into ``layer`` (``"qkv+proj"``, ``"proj"`` or ``"none"``)."""
    names = {"qkv+proj": ("to_q", "to_k", "to_v", "to_out"), "proj": ("to_out",), "none": ()}[mode]
    for name in names:
        own = getattr(layer, name)
        if own is None:
            continue
        own.load_state_dict(getattr(attn, name).state_dict())


__all__ = ["JOINT_CALL_KWARGS", "JOINT_MECHANISMS", "JOINT_PROCESSORS", "JointLayer", "JointProcessor", "ClearProcessor",
           "LiTProcessor", "LinFusionProcessor", "check_joint_attention_kwargs", "inherit_joint", "joint_layout",
           "processor_class"]

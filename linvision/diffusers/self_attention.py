"""Self-attention families (UNet, DiT, PixArt, SANA): a linvision mixer in place of a diffusers ``Attention``.

The adapter holds one mixer per replaced ``attn1``; :class:`SelfAttentionShell` puts it where the
``Attention`` was, with diffusers' call signature, and gives it the level's ``(h, w)`` from the adapter's
:class:`~linvision.diffusers.geometry.LatentGeometry`. The module is replaced, not the processor (as
LinFusion does), so ``set_attn_processor`` calls of other tools (IP-Adapter loading sets every processor)
cannot remove it, and the original ``Attention`` is kept untouched for an exact uninstall.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor, nn

from ..mixers import TokenMixer, create_mixer, mixer_options
from ..mixers.base import QKVMixer
from ..mixers.inherit import copy_qkv_proj, effective_linear, softmax_attention_weights
from .geometry import LatentGeometry

INHERIT_MODES = ("qkv+proj", "proj", "none")
# The papers' initialisation: LinFusion trains from PyTorch's default init (official code); LiT, CLEAR,
# LINA and DyDiLA (a refined LiT) start from the teacher's projections.
DEFAULT_INHERIT = {"linfusion": "none", "sana": "qkv+proj"}  # SANA: its own attention's weights


def default_inherit(mechanism: str) -> str:
    """The paper's initialisation for ``mechanism``; ``"none"`` for mixers whose projections a softmax
    attention does not map onto (e.g. NaLa's fused ``qkvg``)."""
    if mechanism in DEFAULT_INHERIT:
        return DEFAULT_INHERIT[mechanism]
    from ..mixers import mixer_class

    return "qkv+proj" if issubclass(mixer_class(mechanism), QKVMixer) else "none"


def layout_options(mechanism: str, attn: nn.Module) -> Dict[str, Any]:
    """Constructor options that make mixer ``mechanism`` match ``attn``'s bias layout.

    ``qkv_bias`` is True when any of ``to_q/to_k/to_v`` has a bias; the output-bias option is ``out_bias``
    (LinFusion, SANA) or ``proj_bias`` (the rest); ``qk_norm`` (SANA) is True when ``attn`` has SANA-1.5's
    RMSNorm over all heads' channels. Options the mixer does not take are left out.
    """
    accepted = mixer_options(mechanism)
    src = softmax_attention_weights(attn, allow_qk_norm="qk_norm" in accepted)
    wanted = {"qkv_bias": src.qkv_bias is not None, "proj_bias": src.proj_bias is not None,
              "out_bias": src.proj_bias is not None}
    if "qk_norm" in accepted:
        wanted["qk_norm"] = _has_channel_qk_norm(attn)
    return {k: v for k, v in wanted.items() if k in accepted}


def _has_channel_qk_norm(attn: nn.Module) -> bool:
    """True for ``Attention(qk_norm="rms_norm_across_heads")`` (SANA-1.5/Sprint), False without QK norm;
    ``ValueError`` for another QK norm (per-head or LayerNorm), which a channel RMSNorm would not reproduce."""
    norms = [getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)]
    if all(n is None for n in norms):
        return False
    dim = attn.to_q.out_features
    if all(type(n).__name__ == "RMSNorm" and getattr(n, "weight", None) is not None and n.weight.numel() == dim
           for n in norms):
        return True
    raise ValueError(f"unsupported QK norm {type(norms[0]).__name__} on this attention: the sana mixer takes "
                     "an RMSNorm with weight over all heads' channels (qk_norm='rms_norm_across_heads')")


def inherit_weights(mixer: TokenMixer, attn: nn.Module, mode: str) -> None:
    """Copy ``attn``'s ``to_q/to_k/to_v/to_out[0]`` into ``mixer`` per ``mode`` (see :data:`INHERIT_MODES`).

    ``qkv``/``proj`` mixers get the fused layout (:func:`~linvision.mixers.inherit.copy_qkv_proj`); mixers
    with diffusers' own names (LinFusion) get the linears as they are. ``ValueError`` for a mixer with
    neither layout unless ``mode="none"``.
    """
    if mode not in INHERIT_MODES:
        raise ValueError(f"unknown inherit={mode!r}; expected one of {INHERIT_MODES}")
    if mode == "none":
        return
    src = softmax_attention_weights(attn, allow_qk_norm=getattr(mixer, "norm_q", None) is not None)
    if isinstance(mixer, QKVMixer):
        copy_qkv_proj(mixer, src, mode)
        return
    names = ("to_q", "to_k", "to_v", "to_out")
    if all(hasattr(mixer, n) for n in names) and not hasattr(attn, "to_q"):  # a fused qkv/proj source (a mixer)
        _copy_fused_into_split(mixer, src, mode)
        return
    if all(hasattr(mixer, n) for n in names):
        own = [mixer.to_q, mixer.to_k, mixer.to_v] if mode == "qkv+proj" else []
        theirs = [attn.to_q, attn.to_k, attn.to_v] if mode == "qkv+proj" else []
        with torch.no_grad():
            for dst, s in zip(own + [mixer.to_out[0]], theirs + [attn.to_out[0]]):
                s = effective_linear(s)  # an nn.Linear, or a peft LoRA layer with its active deltas
                dst.weight.copy_(s.weight)
                if dst.bias is not None and s.bias is not None:
                    dst.bias.copy_(s.bias)
        if mode == "qkv+proj":  # QK norms (SANA-1.5) belong with the q/k projections
            for name in ("norm_q", "norm_k"):
                dst, s = getattr(mixer, name, None), getattr(attn, name, None)
                if dst is not None and s is not None:
                    dst.load_state_dict(s.state_dict())
        return
    raise ValueError(
        f"{type(mixer).__name__} has neither qkv/proj nor to_q/to_k/to_v/to_out projections, so it cannot "
        "inherit a softmax attention's weights; pass inherit='none'"
    )


@torch.no_grad()
def _copy_fused_into_split(mixer: TokenMixer, src, mode: str) -> None:
    """``src``'s fused ``qkv`` rows ``[q; k; v]`` and ``proj`` into ``to_q/to_k/to_v/to_out[0]`` per ``mode``."""
    pairs = [(mixer.to_out[0], src.proj_weight, src.proj_bias)]
    if mode == "qkv+proj":
        biases = src.qkv_bias.chunk(3) if src.qkv_bias is not None else (None,) * 3
        pairs += list(zip((mixer.to_q, mixer.to_k, mixer.to_v), src.qkv_weight.chunk(3), biases))
    for dst, weight, bias in pairs:
        dst.weight.copy_(weight)
        if dst.bias is not None and bias is not None:
            dst.bias.copy_(bias)


def build_mixer(mechanism: str, dim: int, heads: int, options: Dict[str, Any]) -> TokenMixer:
    """``create_mixer`` with the mechanism's options; unknown names and options raise ``ValueError``."""
    return create_mixer(mechanism, dim=dim, num_heads=heads, **options)


# cross_attention_kwargs a replaced self-attention accepts: its own grid override, and what diffusers passes
# alongside for the cross-attention (LoRA scale, IP-Adapter masks)
SHELL_CALL_KWARGS = ("linvision_grid", "scale", "ip_adapter_masks")


class SelfAttentionShell(nn.Module):
    """A linvision mixer behind diffusers' self-attention call: ``(B, N, C)`` → ``(B, N, C)``.

    ``forward(hidden_states, encoder_hidden_states=None, attention_mask=None, **cross_attention_kwargs)``
    runs ``mixer(hidden_states, hw, 0)`` with ``hw = geometry.grid_for(N)``, or the per-call
    ``linvision_grid=(h, w)`` of ``cross_attention_kwargs`` when its product is N. Cross-attention input and
    attention masks raise ``ValueError`` (the replaced modules are pure self-attentions). diffusers hands the
    same ``cross_attention_kwargs`` to the block's cross-attention too, so the keys meant for it (LoRA
    ``scale``, IP-Adapter's ``ip_adapter_masks``) pass through unused here, as in LinFusion; any other key is a
    ``ValueError`` rather than silently dropped.
    """

    def __init__(self, mixer: TokenMixer, geometry: LatentGeometry):
        super().__init__()
        self.mixer = mixer
        self.geometry = geometry  # shared with the adapter; not a module, not state

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        **cross_attention_kwargs: Any,
    ) -> Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("a linvision self-attention got encoder_hidden_states (cross-attention is not replaced)")
        if attention_mask is not None:
            raise ValueError("linvision self-attention does not support attention masks")
        if hidden_states.dim() != 3:
            raise ValueError(f"expected hidden_states of shape (B, N, C), got {tuple(hidden_states.shape)}")
        unknown = sorted(set(cross_attention_kwargs) - set(SHELL_CALL_KWARGS))
        if unknown:
            raise ValueError(f"cross_attention_kwargs {unknown} are not taken by a linvision self-attention; "
                             f"valid: {', '.join(SHELL_CALL_KWARGS)}")
        n = hidden_states.shape[1]
        grid = cross_attention_kwargs.get("linvision_grid")
        hw = tuple(grid) if grid is not None and grid[0] * grid[1] == n else self.geometry.grid_for(n)
        return self.mixer(hidden_states, hw, 0)


__all__ = ["INHERIT_MODES", "SelfAttentionShell", "build_mixer", "default_inherit", "inherit_weights", "layout_options"]

"""The mixer registry: one file per mechanism, one line per name here."""
from __future__ import annotations

import inspect
from types import MappingProxyType
from typing import List, Type

from .base import TokenMixer, check_tokens
from .clear import ClearAttention
from .dydila import DyDiLA
from .hedgehog import HedgehogAttention
from .gated_delta import BidirectionalGDN
from .gla import ViGGatedLinearAttention
from .infsa import InfSAAttention
from .kda import KimiDeltaAttention
from .lightnet import LightNetAttention
from .liger import LigerAttention
from .lina import LinaAttention
from .linear import LinearAttention
from .linfusion import LinFusionAttention
from .lion import LionAttention
from .lit import LiTAttention
from .lolcats import LolcatsAttention
from .nala import NormAwareLinearAttn, VanillaSelfAttention
from .plstm import PLSTMMixer
from .sana import SanaAttention
from .softmax import SoftmaxAttention
from .tracing import MixerTraceError, symbolic_trace_at
from .transnormer import NormAttention
from .transnormer_diag import DiagAttention

MIXERS = MappingProxyType(
    {
        "clear": ClearAttention,
        "dydila": DyDiLA,
        "hedgehog": HedgehogAttention,
        "gated_delta": BidirectionalGDN,
        "gla": ViGGatedLinearAttention,
        "infsa": InfSAAttention,
        "kda": KimiDeltaAttention,
        "lightnet": LightNetAttention,
        "liger": LigerAttention,
        "lina": LinaAttention,
        "linear": LinearAttention,
        "linfusion": LinFusionAttention,
        "lion": LionAttention,
        "lit": LiTAttention,
        "lolcats": LolcatsAttention,
        "nala": NormAwareLinearAttn,
        "nala_softmax": VanillaSelfAttention,
        "plstm": PLSTMMixer,
        "sana": SanaAttention,
        "softmax": SoftmaxAttention,
        "transnormer": NormAttention,
        "transnormer_diag": DiagAttention,
    }
)


def list_mixers() -> List[str]:
    """Names accepted by :func:`create_mixer`, sorted."""
    return sorted(MIXERS)


def mixer_class(name: str) -> Type[TokenMixer]:
    """The class registered under ``name``; ``ValueError`` for an unknown name."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; available: {', '.join(list_mixers())}")
    return MIXERS[name]


def mixers_supporting(flag: str) -> List[str]:
    """Sorted names of the mixers whose class sets ``flag`` (``"supports_rope"``, ``"supports_qk_norm"``)."""
    return [name for name in list_mixers() if getattr(MIXERS[name], flag, False)]


def mixer_options(name: str) -> List[str]:
    """Constructor keyword arguments of mixer ``name`` (``dim`` and ``num_heads`` included)."""
    params = inspect.signature(mixer_class(name).__init__).parameters
    return [p for p in params if p != "self"]


def create_mixer(name: str, dim: int, num_heads: int = 8, **options) -> TokenMixer:
    """Build mixer ``name`` for ``dim`` channels and ``num_heads`` heads; mechanism options as kwargs.

    Unknown names and unknown options raise ``ValueError`` naming what is accepted.
    """
    known = mixer_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for mixer {name!r}; accepted: {known}")
    return mixer_class(name)(dim=dim, num_heads=num_heads, **options)


__all__ = ["MIXERS", "MixerTraceError", "TokenMixer", "check_tokens", "create_mixer", "list_mixers", "mixer_class",
           "mixer_options", "mixers_supporting", "symbolic_trace_at"]

"""The output norms of TransNormer's attentions, computed in fp32, with the official parameter names.

Official code: ``OpenNLPLab/fairseq-evo @38fa81f: fairseq/modules/norm/rms_norm.py`` (``SimpleRMSNorm``,
``RMSNorm``, ``GatedRMSNorm``) and ``fairseq/modules/helpers/helpers.py::get_norm_fn`` (any other name is
``nn.LayerNorm``). Each normalises over the last dim ``d`` (all heads together): with
``rms(x) = ‖x‖₂ · d^-½`` and ``eps = 1e-8`` added to the rms (not inside the root),

- ``simplermsnorm``: ``x / (rms(x) + eps)`` (no parameters; the paper's TransNormer T1/T2 choice)
- ``rmsnorm``: ``scale ⊙ x / (rms(x) + eps)``
- ``gatedrmsnorm``: ``scale ⊙ x / (rms(x) + eps) ⊙ sigmoid(gate ⊙ x)`` (the gate sees the raw ``x``)
- ``layernorm``: ``nn.LayerNorm(d)`` (eps 1e-5, ``weight``/``bias``)

Inputs of any float dtype are normalised in fp32 (fp64 stays fp64) and returned in fp32/fp64: the callers
feed unbounded attention outputs, which can exceed the fp16 range before normalisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NORM_TYPES = ("simplermsnorm", "rmsnorm", "gatedrmsnorm", "layernorm")
RMS_EPS = 1e-8  # the official default of the three RMS norms


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _rms_normed(x: Tensor, eps: float) -> Tensor:
    return x / (x.norm(2, dim=-1, keepdim=True) * x.shape[-1] ** -0.5 + eps)


class SimpleRMSNorm(nn.Module):
    """``x / (rms(x) + eps)`` over the last dim ``d``; no parameters. ``(…, d) → (…, d)`` in fp32."""

    def __init__(self, d: int, eps: float = RMS_EPS):
        super().__init__()
        self.d, self.eps = d, eps

    def forward(self, x: Tensor) -> Tensor:
        return _rms_normed(_wide(x), self.eps)

    def extra_repr(self) -> str:
        return f"{self.d}, eps={self.eps}"


class RMSNorm(SimpleRMSNorm):
    """``scale ⊙ x / (rms(x) + eps)``; ``scale`` starts at ones."""

    def __init__(self, d: int, eps: float = RMS_EPS):
        super().__init__(d, eps)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        x = _wide(x)
        return self.scale.to(x.dtype) * _rms_normed(x, self.eps)


class GatedRMSNorm(RMSNorm):
    """``scale ⊙ x / (rms(x) + eps) ⊙ sigmoid(gate ⊙ x)``; ``scale`` and ``gate`` start at ones."""

    def __init__(self, d: int, eps: float = RMS_EPS):
        super().__init__(d, eps)
        self.gate = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        x = _wide(x)
        return self.scale.to(x.dtype) * _rms_normed(x, self.eps) * torch.sigmoid(self.gate.to(x.dtype) * x)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm(d)`` (the official fallback of ``get_norm_fn``) evaluated in fp32."""

    def forward(self, x: Tensor) -> Tensor:
        x = _wide(x)
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


NORMS = {"simplermsnorm": SimpleRMSNorm, "rmsnorm": RMSNorm, "gatedrmsnorm": GatedRMSNorm, "layernorm": LayerNorm}


def build_norm(norm_type: str, dim: int) -> nn.Module:
    """The norm named ``norm_type`` (one of :data:`NORM_TYPES`, already validated) over ``dim`` channels."""
    return NORMS[norm_type](dim)


def has_parameters(norm_type: str) -> bool:
    """Whether the norm ``norm_type`` holds learnable parameters."""
    return norm_type != "simplermsnorm"


__all__ = ["NORM_TYPES", "GatedRMSNorm", "LayerNorm", "RMSNorm", "SimpleRMSNorm", "build_norm", "has_parameters"]

"""The papers' distillation loss: task loss + output matching + per-layer attention-output matching (+ LiT's
variance term), every term a mean squared error in fp32.

``L = w_task·MSE(ŷ_S, target) + w_output·MSE(ŷ_S, ŷ_T) + w_feature·mean_l MSE(A_S^l, A_T^l) + w_variance·MSE(Σ_S, Σ_T)``
``+ w_attention·mean_l CE(softmax weights, mixer weights)`` (Hedgehog's attention-weight transfer,
:mod:`linvision.distill.transfer`; a cross-entropy, the one term that is not an MSE).

- LinFusion: ``(1, 0.5, 0.5, 0)`` over every ``attn1``; CLEAR: the same over its chosen layers (flow target).
- LiT's hybrid KD: ``L_simple + 0.5‖ε_T − ε_S‖² + 0.05‖Σ_T − Σ_S‖²`` = ``(1, 0.5, 0, 0.05)``.

For a learned-sigma denoiser (DiT, PixArt: ``C_out = 2·C``) the prediction ``ŷ`` is the first ``C`` channels
and ``Σ`` the rest; the task and output terms see ``ŷ`` only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

TERMS = ("task", "output", "feature", "variance", "attention")


@dataclass(frozen=True)
class LossWeights:
    """Weight of each term (0 switches a term off; it is still measured when the teacher runs)."""

    task: float = 1.0
    output: float = 0.5
    feature: float = 0.5
    variance: float = 0.0
    attention: float = 0.0

    def needs_teacher(self) -> bool:
        return any(getattr(self, k) != 0 for k in ("output", "feature", "variance"))

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


LINFUSION = LossWeights(1.0, 0.5, 0.5, 0.0)
CLEAR = LossWeights(1.0, 0.5, 0.5, 0.0)
LIT = LossWeights(1.0, 0.5, 0.0, 0.05)


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return F.mse_loss(a.float(), b.float())


def feature_mse(student, teacher) -> Tensor:
    """MSE of one layer's outputs: tensors, or tuples/lists of tensors (the mean over their elements)."""
    if isinstance(student, Tensor):
        return _mse(student, teacher)
    parts = [(s, t) for s, t in zip(student, teacher) if isinstance(s, Tensor)]
    if not parts:
        raise ValueError(f"a captured layer output holds no tensor: {type(student).__name__}")
    return torch.stack([_mse(s, t) for s, t in parts]).mean()


def split_prediction(out: Tensor, channels: int):
    """``(prediction, variance or None)`` of a denoiser output ``(B, C_out, …)`` whose target has ``channels``."""
    if out.shape[1] == channels:
        return out, None
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    raise ValueError(f"denoiser output has {out.shape[1]} channels for a {channels}-channel target")


def distill_loss(
    student_out: Tensor,
    target: Tensor,
    weights: LossWeights,
    teacher_out: Optional[Tensor] = None,
    student_features: Sequence = (),
    teacher_features: Sequence = (),
    attention: Optional[Tensor] = None,
) -> Dict[str, Tensor]:
    """``{"loss", "task", "output", "feature", "variance"}`` (scalars, fp32).

    ``student_out``/``teacher_out``: denoiser outputs ``(B, C or 2C, H, W)``; ``target (B, C, H, W)``;
    features: the captured per-layer outputs (same order in both). Terms without a teacher (or without
    learned sigma / layers) are absent; ``attention``: the student's attention-weight cross-entropy, when
    measured. ``ValueError`` when a term with non-zero weight cannot be computed.
    """
    channels = target.shape[1]
    pred_s, var_s = split_prediction(student_out, channels)
    terms = {"task": _mse(pred_s, target)}
    if teacher_out is not None:
        pred_t, var_t = split_prediction(teacher_out, channels)
        terms["output"] = _mse(pred_s, pred_t)
        if var_s is not None:
            terms["variance"] = _mse(var_s, var_t)
        if len(student_features) != len(teacher_features):
            raise ValueError(f"{len(student_features)} student features but {len(teacher_features)} teacher features")
        if student_features:
            terms["feature"] = torch.stack([feature_mse(s, t) for s, t in zip(student_features, teacher_features)]).mean()
    if attention is not None:
        terms["attention"] = attention.float()
    total = torch.zeros((), device=target.device, dtype=torch.float32)
    for name in TERMS:
        weight = getattr(weights, name)
        if weight == 0:
            continue
        if name not in terms:
            why = {"output": "no teacher output", "feature": "no feature layers",
                   "variance": "the denoiser has no learned-sigma channels",
                   "attention": "no mixer with attention_rows: hedgehog, lolcats, liger"}.get(name, "")
            raise ValueError(f"loss weight {name}={weight} but the term cannot be computed ({why})")
        total = total + weight * terms[name]
    terms["loss"] = total
    return terms


__all__ = ["CLEAR", "LINFUSION", "LIT", "LossWeights", "TERMS", "distill_loss", "feature_mse", "split_prediction"]

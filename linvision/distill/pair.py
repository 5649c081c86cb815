"""Teacher and student from one pipeline: the student is the pipeline's denoiser with an adapter installed,
the teacher a frozen copy of the denoiser taken before the install.

>>> pair = DistillPair.build(pipe, "linfusion", trainable=["adapter"], feature_layers="all")
>>> terms = pair.losses(x0, noise, index, cond, objective, conditioner, LINFUSION)   # loss + each term
>>> terms["loss"].backward(); optimizer.step(); pair.clear()

Which parameters train is chosen by name patterns over the student's ``named_parameters()`` (glob, e.g.
``*.attn.to_q.*``); the word ``adapter`` stands for every parameter of the adapter (LinFusion: the new
attention modules only) and ``*`` for the whole denoiser (LiT trains everything after weight
inheritance). Everything else, and the whole teacher, has ``requires_grad=False``.
"""
from __future__ import annotations

import copy
import fnmatch
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..diffusers import DiffusersAdapter, denoiser_of
from ..diffusers.students import build_student
from .hooks import FeatureHooks, resolve_layers
from .loss import LossWeights, distill_loss
from .transfer import AttentionTransfer

ADAPTER = "adapter"


def select_trainable(model: nn.Module, patterns: Sequence[str], adapter: Optional[nn.Module] = None) -> List[str]:
    """Set ``requires_grad`` on ``model``'s parameters whose name matches one of ``patterns`` (glob) or,
    for the pattern ``"adapter"``, that belong to ``adapter``; every other parameter is frozen.

    Returns the trainable names (``named_parameters`` order). ``ValueError`` for a pattern that matches
    nothing (naming a few parameter names) or when nothing is selected.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    adapter_ids = {id(p) for p in adapter.parameters()} if adapter is not None else set()
    named = list(model.named_parameters())
    chosen = set()
    for pattern in patterns:
        if pattern == ADAPTER:
            if adapter is None:
                raise ValueError("trainable pattern 'adapter' needs an adapter")
            hits = {n for n, p in named if id(p) in adapter_ids}
        else:
            hits = {n for n, _ in named if fnmatch.fnmatchcase(n, pattern)}
        if not hits:
            examples = [n for n, _ in named][:: max(1, len(named) // 8)][:8]
            raise ValueError(f"trainable pattern {pattern!r} matches no parameter; names look like {examples}")
        chosen |= hits
    for name, param in named:
        param.requires_grad_(name in chosen)
    return [n for n, _ in named if n in chosen]


class DistillPair:
    """A frozen ``teacher`` denoiser, the ``student`` (the pipeline's denoiser + ``adapter``), and feature
    hooks on the ``layers`` both share (names from the adapter's ``modules_list``)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, adapter: DiffusersAdapter, layers: Sequence[str],
                 trainable: Sequence[str]):
        self.teacher = teacher
        self.student = student
        self.adapter = adapter
        self.layers = list(layers)
        self.trainable = list(trainable)
        self.teacher_hooks = FeatureHooks(teacher, self.layers)
        self.student_hooks = FeatureHooks(student, self.layers)
        self.transfer: Optional[AttentionTransfer] = None  # hooks for the attention term, made when first needed

    @classmethod
    def build(
        cls,
        pipe,
        mechanism: str,
        options: Optional[Dict[str, Any]] = None,
        inherit: Optional[str] = None,
        trainable: Union[str, Sequence[str]] = (ADAPTER,),
        feature_layers: Union[str, Sequence[str], None] = "all",
        adapter: Optional[DiffusersAdapter] = None,
    ) -> "DistillPair":
        """Copy the teacher, install the family's student part (an adapter, ``construct_for(pipe, mechanism,
        inherit, **options)``; for ``LinVisionDiT`` a :class:`~linvision.diffusers.families.MixerStudent`), or the
        given ``adapter``, choose the trainable parameters and hook the feature layers.

        ``ValueError`` for unknown feature layers (listing the valid ones) or trainable patterns matching nothing.
        """
        teacher = copy.deepcopy(denoiser_of(pipe))
        if adapter is None:
            adapter = build_student(pipe, mechanism, inherit, options)
        else:
            adapter.install(pipe)
        valid = [e["module_name"] for e in adapter.config.modules_list]
        student = denoiser_of(pipe)  # the denoiser itself with an adapter; a new model for the linvision_dit family
        try:
            layers = resolve_layers(valid, feature_layers)
            names = select_trainable(student, trainable, adapter)
        except ValueError:
            adapter.uninstall()
            raise
        teacher.requires_grad_(False)
        teacher.eval()
        return cls(teacher, student, adapter, layers, names)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self, model: Optional[nn.Module] = None) -> List[nn.Parameter]:
        model = self.student if model is None else model
        wanted = set(self.trainable)
        return [p for n, p in model.named_parameters() if n in wanted]

    def trains_outside_adapter(self) -> bool:
        """True when a trainable parameter is not the adapter's (the base denoiser changes too, e.g. LiT's ``*``)."""
        ids = {id(p) for p in self.adapter.parameters()}
        return any(id(p) not in ids for p in self.trainable_parameters())

    # ------------------------------------------------------------------ forward
    def set_capture(self, enabled: bool) -> None:
        self.teacher_hooks.enabled = self.student_hooks.enabled = enabled

    def clear(self) -> None:
        """Drop the captured features (once per step, after the optimizer step)."""
        self.teacher_hooks.clear()
        self.student_hooks.clear()

    def losses(self, x0: Tensor, noise: Tensor, index: Tensor, cond: Dict[str, Tensor], objective, conditioner,
               weights: LossWeights, student: Optional[nn.Module] = None, dtype: Optional[torch.dtype] = None
               ) -> Dict[str, Tensor]:
        """One distillation forward: ``{"loss", "task", "output", "feature", "variance"}`` (see :mod:`.loss`), and
        ``"attention"`` when ``weights.attention`` is set (the mixers' attention-weight cross-entropy against the
        softmax weights of their own, inherited q/k: no teacher forcing here, each layer sees the student's input).

        ``x0``, ``noise``: latents ``(B, C, H, W)``; ``index (B,)``: schedule indices; ``cond``: the batch's
        condition. The teacher runs first, without gradients (when a term needs it). ``student`` is the
        module to call (e.g. the DDP-wrapped one; default ``self.student``); ``dtype`` the input dtype of
        the denoisers (default fp32).
        """
        student = self.student if student is None else student
        dtype = dtype or torch.float32
        x_t = objective.add_noise(x0, noise, index).to(dtype)
        t = objective.model_timestep(index)
        target = objective.target(x0, noise, index)
        teacher_out = None
        self.clear()
        if weights.needs_teacher():
            with torch.no_grad():
                teacher_out = conditioner.call(self.teacher, x_t, t, cond)
        attention = None
        if weights.attention:
            if self.transfer is None:
                self.transfer = AttentionTransfer(self.student, weights=True, outputs=False, teacher_forcing=False)
            self.transfer.enabled = True
        try:
            student_out = conditioner.call(student, x_t, t, cond)
        finally:
            if self.transfer is not None:
                self.transfer.enabled = False  # sampling and evaluation calls skip the term
        if weights.attention:
            attention = self.transfer.loss(weights=1.0, outputs=0.0)["weights"]
            self.transfer.clear()
        features = ([], [])
        if teacher_out is not None and self.layers:
            features = (self.student_hooks.features(), self.teacher_hooks.features())
        return distill_loss(student_out, target, weights, teacher_out, *features, attention=attention)


__all__ = ["ADAPTER", "DistillPair", "select_trainable"]

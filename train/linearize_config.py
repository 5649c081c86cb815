"""The ``linvision linearize`` configuration: the classification job's ``data``/``optim``/``train`` sections
(:mod:`linvision.train.config`, same keys and checks) plus ``teacher``, ``student``, ``transfer`` and ``finetune``.

``train.epochs`` and ``optim`` are stage 2's (fine-tuning); stage 1 (attention transfer) has its own
``transfer.epochs``/``transfer.lr``. Overrides as in ``classify``: ``transfer.epochs=2 student.mixer=hedgehog``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Optional, Sequence

from .config import (ConfigError, DataConfig, MixupConfig, OptimConfig, TrainConfig, build_sections,
                     describe_sections, doc_field, load_tree, section_tree, validate)

_doc = doc_field


@dataclass
class TeacherConfig:
    """``teacher:`` the pretrained softmax classifier."""

    path: Optional[str] = _doc(None, "a `linvision classify` run directory (config.yaml + model.safetensors)")
    name: Optional[str] = _doc(None, "instead of path: a timm model name loaded with pretrained=True "
                               "(e.g. deit_small_patch16_224)")
    weights: str = _doc("model", "path: 'model' (model.safetensors) or 'ema' (model_ema.safetensors)",
                       choices=("model", "ema"))


@dataclass
class StudentConfig:
    """``student:`` the linear mixer that replaces every softmax attention (q/k/v/proj inherited)."""

    mixer: str = _doc("lolcats", "a linvision mixer name (hedgehog, lolcats, liger, linear, ...)")
    options: Dict[str, Any] = _doc({}, "the mixer's options, as linvit's mixer_kwargs (e.g. {radius: 2})")
    strict: bool = _doc(True, "refuse teachers whose attention has parts the mixer cannot inherit (q/k norms)")


@dataclass
class TransferConfig:
    """``transfer:`` stage 1, attention transfer on unlabelled images; only the mixers' new parameters train."""

    epochs: int = _doc(2, "stage-1 epochs (0: skip; skipped anyway when the mixers add no parameters, as liger)",
                     min=0)
    lr: float = _doc(1.0e-2, "AdamW learning rate (LoLCATs: 1e-2), cosine-decayed to min_lr", min=0, min_open=True)
    min_lr: float = _doc(1.0e-4, "learning rate at the end of stage 1", min=0)
    weight_decay: float = _doc(0.0, "AdamW weight decay", min=0)
    weights: float = _doc(1.0, "factor of the attention-weight cross-entropy (Hedgehog; LoLCATs' xent_factor)",
                           min=0)
    outputs: float = _doc(1000.0, "factor of the attention-output MSE (LoLCATs' mse_factor)", min=0)
    chunk: int = _doc(64, "query rows per chunk of the weight loss (memory linear in the token count)",
                       min=1)
    teacher_forcing: bool = _doc(True, "every layer sees the softmax teacher's activations (LoLCATs)")


@dataclass
class FinetuneConfig:
    """``finetune:`` stage 2, logit distillation (KL to the teacher) plus the label loss."""

    mode: str = _doc("lora", "'lora' (peft LoRA on each attention's qkv/proj + the new parameters), 'full', or "
                     "'none' (no stage 2: train.epochs is ignored)", choices=("lora", "full", "none"))
    lora_rank: int = _doc(8, "LoRA rank (LoLCATs: 8)", min=1)
    lora_alpha: float = _doc(16.0, "LoRA alpha (LoLCATs: 16)", min=0, min_open=True)
    lora_targets: List[str] = _doc(["qkv", "proj"], "linears inside each block's attention that get LoRA")
    kl: float = _doc(1.0, "factor of KL(teacher || student) on temperature-scaled logits (times T²)",
                     min=0)
    label: float = _doc(1.0, "factor of the cross-entropy with the labels (train.label_smoothing)", min=0)
    temperature: float = _doc(1.0, "distillation temperature T", min=0, min_open=True)


SECTIONS = MappingProxyType({"teacher": TeacherConfig, "student": StudentConfig, "transfer": TransferConfig,
                             "finetune": FinetuneConfig, "data": DataConfig, "optim": OptimConfig,
                             "train": TrainConfig})


@dataclass
class LinearizeConfig:
    """The whole job configuration (typed sections)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)  # not a section: no mixing (for the shared checks)

    def to_dict(self) -> Dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def build_linearize_config(tree: Any) -> LinearizeConfig:
    """A checked :class:`LinearizeConfig` from a nested dict."""
    tree = section_tree(tree, list(SECTIONS))
    cfg = LinearizeConfig(**build_sections(tree, SECTIONS))
    validate(cfg)  # the classification job's data/train checks
    _validate(cfg)
    return cfg


def _validate(cfg: LinearizeConfig) -> None:
    """The cross-field checks of the linearize sections (each field's own range is its ``doc_field``'s)."""
    t, s, tr, f = cfg.teacher, cfg.student, cfg.transfer, cfg.finetune
    if (t.path is None) == (t.name is None):
        raise ConfigError("teacher: give exactly one of teacher.path (a classify run) or teacher.name (timm)")
    if not (t.path or t.name):
        raise ConfigError("teacher.path and teacher.name must not be empty strings")
    if t.weights == "ema" and t.path is None:
        raise ConfigError("teacher.weights=ema applies only to teacher.path (a classify run with EMA weights)")
    if not s.mixer:
        raise ConfigError("student.mixer: a mixer name (hedgehog, lolcats, liger, linear, ...), got ''")
    if tr.weights == 0 and tr.outputs == 0:
        raise ConfigError("transfer.weights and transfer.outputs are both 0: stage 1 would have no loss")
    if tr.min_lr > tr.lr:
        raise ConfigError(f"transfer.min_lr={tr.min_lr} is above transfer.lr={tr.lr}: the schedule decays to it")
    if f.kl == 0 and f.label == 0:
        raise ConfigError("finetune.kl and finetune.label are both 0: stage 2 would have no loss")
    if f.mode == "lora" and not f.lora_targets:
        raise ConfigError("finetune.lora_targets: give the linears that get LoRA (e.g. [qkv, proj])")


def load_linearize_config(path: Optional[str], overrides: Sequence[str] = ()) -> LinearizeConfig:
    """Read a YAML file, apply ``section.key=value`` overrides, check and return it."""
    return build_linearize_config(load_tree(path, overrides))


def describe() -> str:
    """Every config key with its default and help, for ``--help``."""
    return "\n".join(["config keys (section.key: default  help):", *describe_sections(SECTIONS)])


__all__ = ["FinetuneConfig", "LinearizeConfig", "StudentConfig", "TeacherConfig", "TransferConfig",
           "build_linearize_config", "describe", "load_linearize_config"]

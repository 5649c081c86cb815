"""The distillation job's configuration: sections, defaults and help (``linvision distill --help``).

Plain YAML with the sections below (``configs/distill/*.yaml``); ``section.key=value`` overrides on the
command line (YAML values; ``student.options.radius=8`` reaches into a mapping). An unknown section or
key is an error listing the valid ones; nothing in a config is executed. Parsing, type checks and
overrides are the classify job's (:mod:`linvision.train.config`).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .config import ConfigError, build_section, describe_sections, doc_field, load_tree

_doc = doc_field
SOURCES = ("images", "classes", "digits", "teacher")


@dataclass
class PipelineSection:
    """``pipeline:`` the teacher pipeline (a diffusers folder or hub id)."""

    model: Optional[str] = _doc(None, "diffusers pipeline: a local folder or a hub id (required)")
    scheduler_overrides: Dict[str, Any] = _doc({}, "scheduler config keys to change, e.g. {prediction_type: v_prediction}")


@dataclass
class StudentSection:
    """``student:`` the adapter that replaces the attention, and what trains."""

    mechanism: str = _doc("linfusion", "any linvision mixer for UNet/DiT/PixArt (linfusion, lit, lina, dydila, clear, "
                          "...); clear, lit or linfusion for SD3/FLUX")
    options: Dict[str, Any] = _doc({}, "mechanism options, e.g. {projection_mid_dim: 80} (LinFusion-XL: C/16), "
                                   "{radius: 16, pool_factor: 4} (CLEAR), {num_heads: 2} (LiT's few heads)")
    inherit: Optional[str] = _doc(None, "copy the teacher's projections: qkv+proj, proj, none; null = the paper's "
                                  "(LinFusion: none; LiT, CLEAR, LINA, DyDiLA: qkv+proj)")
    trainable: List[str] = _doc(["adapter"], "parameter name patterns (glob) that train; 'adapter' = the adapter's "
                                "parameters (LinFusion), '*' = the whole denoiser (LiT)")
    feature_layers: List[str] = _doc(["all"], "attention outputs matched by the feature term: 'all', names or glob "
                                     "patterns of the replaced attentions (unknown names are an error)")
    gradient_checkpointing: bool = _doc(False, "recompute activations in the backward pass (diffusers' checkpointing)")
    adapter: Optional[str] = _doc(None, "start from this saved adapter (a previous run's adapter/, e.g. the attention-"
                                  "transfer stage of the hedgehog/lolcats recipes) instead of a new one")


@dataclass
class LossSection:
    """``loss:`` weight of each term (LinFusion/CLEAR 1, 0.5, 0.5, 0; LiT 1, 0.5, 0, 0.05)."""

    task: float = _doc(1.0, "MSE to the scheduler's target (epsilon, v, sample or flow-matching)")
    output: float = _doc(0.5, "MSE between student and teacher predictions")
    feature: float = _doc(0.5, "mean over feature_layers of the attention-output MSE")
    variance: float = _doc(0.0, "MSE between the learned-sigma channels (LiT's lambda_2 on DiT/PixArt)")
    attention: float = _doc(0.0, "attention-weight cross-entropy to softmax (Hedgehog's transfer; hedgehog, lolcats, "
                            "liger mixers), mean over their layers")


@dataclass
class DataSection:
    """``data:`` training examples, their conditions, and optional pre-caching to disk."""

    source: str = _doc("images", "images: a folder of images with captions (JSONL or sidecar .txt); classes: an "
                       "image folder with one sub-folder per class; digits: scikit-learn's digits with their labels "
                       "(offline); teacher: samples the teacher draws for data.prompts / data.class_labels")
    root: Optional[str] = _doc(None, "images/classes: the image folder")
    captions: Optional[str] = _doc(None, "images: a JSONL of {file, text} (path relative to root allowed); null = "
                                   "a sidecar <image>.txt per image")
    class_ids: Dict[str, int] = _doc({}, "classes: folder name -> class id (e.g. ImageNet ids); default: sorted order")
    resolution: int = _doc(512, "training resolution in pixels (square): resize the short side, then crop")
    center_crop: bool = _doc(True, "centre crop (false: a random crop, seeded per sample)")
    random_flip: float = _doc(0.0, "horizontal flip probability (needs cache_latents false)")
    max_samples: Optional[int] = _doc(None, "use only the first N examples")
    prompts: List[str] = _doc([], "teacher source: prompts to draw")
    class_labels: List[int] = _doc([], "teacher source: class ids to draw")
    samples_per_condition: int = _doc(1, "teacher source: images per prompt or label (seeds 0..N-1)")
    teacher_steps: int = _doc(25, "teacher source: sampling steps")
    teacher_guidance: float = _doc(4.0, "teacher source: guidance scale")
    cond_dropout: float = _doc(0.0, "probability of the null condition (empty prompt / null class) per sample")
    max_sequence_length: Optional[int] = _doc(None, "text length for T5 encoders (CLEAR assumes 512); null = pipeline's")
    sample_posterior: bool = _doc(True, "draw latents from the VAE posterior (false: its mean)")
    cache_dir: Optional[str] = _doc(None, "pre-cache VAE latents (and text embeddings) here; null = encode each "
                                    "step (the teacher source always caches, by default in output_dir/cache)")
    cache_text: bool = _doc(True, "with cache_dir: also cache the text embeddings (and the empty prompt's)")
    batch_size: int = _doc(1, "examples per process per micro-batch")
    num_workers: int = _doc(0, "data-loader worker processes")


@dataclass
class OptimSection:
    """``optim:`` AdamW (LinFusion: 1e-4, no decay, constant) or Prodigy (CLEAR: lr 1.0, decay 1e-4)."""

    name: str = _doc("adamw", "adamw or prodigy (needs the prodigyopt package)")
    lr: float = _doc(1.0e-4, "learning rate (Prodigy: 1.0)")
    weight_decay: float = _doc(0.0, "decoupled weight decay")
    betas: List[float] = _doc([0.9, 0.999], "Adam betas")
    eps: float = _doc(1.0e-8, "Adam epsilon")
    clip_grad: Optional[float] = _doc(None, "clip the global gradient norm (CLEAR: 1.0; null: off)")
    schedule: str = _doc("constant", "constant or cosine (to min_lr at train.steps)")
    warmup_steps: int = _doc(0, "linear warmup from 0, in optimizer steps")
    min_lr: float = _doc(0.0, "cosine schedule: final learning rate")
    prodigy_bias_correction: bool = _doc(True, "Prodigy's use_bias_correction (CLEAR: true)")
    prodigy_safeguard_warmup: bool = _doc(True, "Prodigy's safeguard_warmup (CLEAR: true)")


@dataclass
class TrainSection:
    """``train:`` the accelerate loop, checkpoints and run directory."""

    output_dir: str = _doc("runs/distill", "run directory: config, checkpoint, logs, plots, sample grids, adapter/")
    seed: int = _doc(0, "seeds adapter init, data order, noise and timesteps")
    steps: int = _doc(10000, "optimizer steps of the run")
    accum_steps: int = _doc(1, "gradient accumulation: micro-batches per optimizer step")
    mixed_precision: Optional[str] = _doc(None, "'no', 'bf16' or 'fp16' (teacher and frozen weights in that dtype, "
                                          "trainable ones fp32); null: from `accelerate launch`")
    cpu: bool = _doc(False, "force CPU even when an accelerator is present")
    threads: Optional[int] = _doc(None, "torch CPU threads per process (null: torch's default)")
    checkpoint_every: Optional[int] = _doc(1000, "checkpoint every N optimizer steps (and at the end)")
    max_steps: Optional[int] = _doc(None, "stop (after checkpointing) at this step, as if killed")
    resume: Optional[str] = _doc(None, "null: fresh; 'auto': output_dir/checkpoint.pt if present; or a path")
    log_every: int = _doc(10, "log the loss terms every N optimizer steps")


@dataclass
class EvalSection:
    """``eval:`` teacher and student samples from the same noise, side by side, and their pixel MSE."""

    enabled: bool = _doc(True, "draw comparison grids (at start, every `every` steps, at the end)")
    every: Optional[int] = _doc(None, "also every N optimizer steps (null: start and end only)")
    seeds: List[int] = _doc([0, 1, 2, 3], "one image per seed (and condition)")
    prompts: List[str] = _doc([], "prompts to draw (text pipelines); default: the first training conditions")
    class_labels: List[int] = _doc([], "class ids to draw (DiT); default: the first training conditions")
    num_conditions: int = _doc(2, "conditions taken from the training data when none are given")
    steps: int = _doc(25, "sampling steps")
    guidance: float = _doc(4.0, "guidance scale (1: none)")
    resolution: Optional[int] = _doc(None, "image size (null: data.resolution)")


SECTIONS = MappingProxyType({"pipeline": PipelineSection, "student": StudentSection, "loss": LossSection,
                             "data": DataSection, "optim": OptimSection, "train": TrainSection, "eval": EvalSection})


@dataclass
class DistillConfig:
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    student: StudentSection = field(default_factory=StudentSection)
    loss: LossSection = field(default_factory=LossSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> Dict[str, Any]:
        return {name: copy.deepcopy(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}


def build_distill_config(tree: Any) -> DistillConfig:
    """A checked :class:`DistillConfig` from nested plain data."""
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    unknown = [k for k in tree if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(map(str, unknown))}; valid sections: {', '.join(SECTIONS)}")
    train = tree.get("train")
    if isinstance(train, Mapping) and train.get("mixed_precision") is False:  # YAML 1.1 reads a bare `no` as false
        tree = dict(tree, train=dict(train, mixed_precision="no"))
    cfg = DistillConfig(**{name: build_section(cls, tree.get(name), name) for name, cls in SECTIONS.items()})
    validate(cfg)
    return cfg


def validate(cfg: DistillConfig) -> None:
    """Cross-field checks."""
    d, t, o, e = cfg.data, cfg.train, cfg.optim, cfg.eval
    if not cfg.pipeline.model:
        raise ConfigError("pipeline.model is required (a local diffusers pipeline folder or a hub id)")
    if d.source not in SOURCES:
        raise ConfigError(f"data.source: expected one of {SOURCES}, got {d.source!r}")
    if d.source in ("images", "classes") and not d.root:
        raise ConfigError(f"data.root is required when data.source is {d.source!r}")
    if d.source == "teacher" and not (d.prompts or d.class_labels):
        raise ConfigError("data.source 'teacher' needs data.prompts or data.class_labels to draw")
    if d.random_flip > 0 and d.cache_dir:
        raise ConfigError("data.random_flip needs uncached latents (data.cache_dir null): cached latents are fixed")
    positive = {"data.resolution": d.resolution, "data.batch_size": d.batch_size, "train.steps": t.steps,
                "train.accum_steps": t.accum_steps, "train.log_every": t.log_every, "eval.steps": e.steps,
                "data.samples_per_condition": d.samples_per_condition, "data.teacher_steps": d.teacher_steps}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if not 0 <= d.cond_dropout < 1:
        raise ConfigError(f"data.cond_dropout must be in [0, 1), got {d.cond_dropout}")
    if t.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ConfigError(f"train.mixed_precision: expected no, bf16, fp16 or null, got {t.mixed_precision!r}")
    if o.name not in ("adamw", "prodigy"):
        raise ConfigError(f"optim.name: expected adamw or prodigy, got {o.name!r}")
    if o.schedule not in ("constant", "cosine"):
        raise ConfigError(f"optim.schedule: expected constant or cosine, got {o.schedule!r}")
    if len(o.betas) != 2:
        raise ConfigError("optim.betas needs 2 values")
    for key in ("task", "output", "feature", "variance"):
        if getattr(cfg.loss, key) < 0:
            raise ConfigError(f"loss.{key} must be >= 0")
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        raise ConfigError("train.checkpoint_every must be >= 1 or null")


def load_distill_config(path: Optional[str], overrides: Sequence[str] = ()) -> DistillConfig:
    """Read YAML ``path`` (``yaml.safe_load``), apply ``overrides``, check."""
    return build_distill_config(load_tree(path, overrides))


def describe() -> str:
    """Every key with its default and help, for ``--help``."""
    return "\n".join(["config keys (section.key: default  help):"] + describe_sections(SECTIONS))


__all__ = ["ConfigError", "DistillConfig", "SECTIONS", "build_distill_config", "describe", "load_distill_config"]

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
                          "...); clear, lit or linfusion for SD3/FLUX; a LinVisionDiT teacher: the student's mixer")
    options: Dict[str, Any] = _doc({}, "mechanism options, e.g. {projection_mid_dim: 80} (LinFusion-XL: C/16), "
                                   "{radius: 16, pool_factor: 4} (CLEAR), {num_heads: 2} (LiT's few heads)")
    inherit: Optional[str] = _doc(None, "copy the teacher's projections: qkv+proj, proj, none; null = the paper's "
                                  "(LinFusion: none; LiT, CLEAR, LINA, DyDiLA: qkv+proj)",
                                  choices=("qkv+proj", "proj", "none"))
    trainable: List[str] = _doc(["adapter"], "parameter name patterns (glob) that train; 'adapter' = the adapter's "
                                "parameters (LinFusion; a LinVisionDiT student: all of it), '*' = the whole denoiser (LiT)")
    feature_layers: List[str] = _doc(["all"], "attention outputs matched by the feature term: 'all', names or glob "
                                     "patterns of the replaced attentions (unknown names are an error)")
    gradient_checkpointing: bool = _doc(False, "recompute activations in the backward pass (diffusers' checkpointing)")
    adapter: Optional[str] = _doc(None, "start from this saved adapter (a previous run's adapter/, e.g. the attention-"
                                  "transfer stage of the hedgehog/lolcats recipes) instead of a new one")


@dataclass
class LossSection:
    """``loss:`` weight of each term (LinFusion/CLEAR 1, 0.5, 0.5, 0; LiT 1, 0.5, 0, 0.05)."""

    task: float = _doc(1.0, "MSE to the scheduler's target (epsilon, v, sample or flow-matching)", min=0)
    output: float = _doc(0.5, "MSE between student and teacher predictions", min=0)
    feature: float = _doc(0.5, "mean over feature_layers of the attention-output MSE", min=0)
    variance: float = _doc(0.0, "MSE between the learned-sigma channels (LiT's lambda_2 on DiT/PixArt)", min=0)
    attention: float = _doc(0.0, "attention-weight cross-entropy to softmax (Hedgehog's transfer; hedgehog, lolcats, "
                            "liger mixers), mean over their layers", min=0)


@dataclass
class DataSection:
    """``data:`` training examples, their conditions, and optional pre-caching to disk."""

    source: str = _doc("images", "images: a folder of images with captions (JSONL or sidecar .txt); classes: an "
                       "image folder with one sub-folder per class; digits: scikit-learn's digits with their labels "
                       "(offline); teacher: samples the teacher draws for data.prompts / data.class_labels",
                       choices=SOURCES)
    root: Optional[str] = _doc(None, "images/classes: the image folder")
    captions: Optional[str] = _doc(None, "images: a JSONL of {file, text} (path relative to root allowed); null = "
                                   "a sidecar <image>.txt per image")
    class_ids: Dict[str, int] = _doc({}, "classes: folder name -> class id (e.g. ImageNet ids); default: sorted order")
    resolution: int = _doc(512, "training resolution in pixels (square): resize the short side, then crop", min=1)
    center_crop: bool = _doc(True, "centre crop (false: a random crop, seeded per sample)")
    random_flip: float = _doc(0.0, "horizontal flip probability (needs cache_latents false)", min=0, max=1)
    max_samples: Optional[int] = _doc(None, "use only the first N examples", min=1)
    prompts: List[str] = _doc([], "teacher source: prompts to draw")
    class_labels: List[int] = _doc([], "teacher source: class ids to draw", min=0)
    samples_per_condition: int = _doc(1, "teacher source: images per prompt or label (seeds 0..N-1)", min=1)
    teacher_steps: int = _doc(25, "teacher source: sampling steps", min=1)
    teacher_guidance: float = _doc(4.0, "teacher source: guidance scale", min=0)
    cond_dropout: float = _doc(0.0, "probability of the null condition (empty prompt / null class) per sample",
                               min=0, max=1, max_open=True)
    max_sequence_length: Optional[int] = _doc(None, "text length for T5 encoders (CLEAR assumes 512); null = pipeline's",
                                              min=1)
    sample_posterior: bool = _doc(True, "draw latents from the VAE posterior (false: its mean)")
    cache_dir: Optional[str] = _doc(None, "pre-cache VAE latents (and text embeddings) here; null = encode each "
                                    "step (the teacher source always caches, by default in output_dir/cache)")
    cache_text: bool = _doc(True, "with cache_dir: also cache the text embeddings (and the empty prompt's)")
    batch_size: int = _doc(1, "examples per process per micro-batch", min=1)
    num_workers: int = _doc(0, "data-loader worker processes", min=0)


@dataclass
class OptimSection:
    """``optim:`` AdamW (LinFusion: 1e-4, no decay, constant) or Prodigy (CLEAR: lr 1.0, decay 1e-4)."""

    name: str = _doc("adamw", "adamw or prodigy (needs the prodigyopt package)", choices=("adamw", "prodigy"))
    lr: float = _doc(1.0e-4, "learning rate (Prodigy: 1.0)", min=0, min_open=True)
    weight_decay: float = _doc(0.0, "decoupled weight decay", min=0)
    betas: List[float] = _doc([0.9, 0.999], "Adam betas", length=2, min=0, max=1, max_open=True)
    eps: float = _doc(1.0e-8, "Adam epsilon", min=0, min_open=True)
    clip_grad: Optional[float] = _doc(None, "clip the global gradient norm (CLEAR: 1.0; null: off)",
                                      min=0, min_open=True)
    schedule: str = _doc("constant", "constant or cosine (to min_lr at train.steps)", choices=("constant", "cosine"))
    warmup_steps: int = _doc(0, "linear warmup from 0, in optimizer steps", min=0)
    min_lr: float = _doc(0.0, "cosine schedule: final learning rate", min=0)
    prodigy_bias_correction: bool = _doc(True, "Prodigy's use_bias_correction (CLEAR: true)")
    prodigy_safeguard_warmup: bool = _doc(True, "Prodigy's safeguard_warmup (CLEAR: true)")


@dataclass
class TrainSection:
    """``train:`` the accelerate loop, checkpoints and run directory."""

    output_dir: str = _doc("runs/distill", "run directory: config, checkpoint, logs, plots, sample grids, adapter/")
    seed: int = _doc(0, "seeds adapter init, data order, noise and timesteps", min=0)
    steps: int = _doc(10000, "optimizer steps of the run", min=1)
    accum_steps: int = _doc(1, "gradient accumulation: micro-batches per optimizer step", min=1)
    mixed_precision: Optional[str] = _doc(None, "'no', 'bf16' or 'fp16' (teacher and frozen weights in that dtype, "
                                          "trainable ones fp32); null: from `accelerate launch`",
                                          choices=("no", "bf16", "fp16"))
    cpu: bool = _doc(False, "force CPU even when an accelerator is present")
    threads: Optional[int] = _doc(None, "torch CPU threads per process (null: torch's default)", min=1)
    checkpoint_every: Optional[int] = _doc(1000, "checkpoint every N optimizer steps (and at the end)", min=1)
    max_steps: Optional[int] = _doc(None, "stop (after checkpointing) at this step, as if killed", min=1)
    resume: Optional[str] = _doc(None, "null: fresh; 'auto': output_dir/checkpoint.pt if present; or a path")
    log_every: int = _doc(10, "log the loss terms every N optimizer steps", min=1)


@dataclass
class EvalSection:
    """``eval:`` teacher and student samples from the same noise, side by side, and their pixel MSE."""

    enabled: bool = _doc(True, "draw comparison grids (at start, every `every` steps, at the end)")
    every: Optional[int] = _doc(None, "also every N optimizer steps (null: start and end only)", min=1)
    seeds: List[int] = _doc([0, 1, 2, 3], "one image per seed (and condition)", min=0)
    prompts: List[str] = _doc([], "prompts to draw (text pipelines); default: the first training conditions")
    class_labels: List[int] = _doc([], "class ids to draw (DiT); default: the first training conditions", min=0)
    num_conditions: int = _doc(2, "conditions taken from the training data when none are given", min=1)
    steps: int = _doc(25, "sampling steps", min=1)
    guidance: float = _doc(4.0, "guidance scale (1: none)", min=0)
    resolution: Optional[int] = _doc(None, "image size (null: data.resolution)", min=1)


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
    """Cross-field checks (each field's own type and range checks are in its ``doc_field``)."""
    d, t = cfg.data, cfg.train
    if not cfg.pipeline.model:
        raise ConfigError("pipeline.model is required (a local diffusers pipeline folder or a hub id)")
    if not t.output_dir:
        raise ConfigError("train.output_dir must be a folder name, got an empty string")
    if d.source in ("images", "classes") and not d.root:
        raise ConfigError(f"data.root is required when data.source is {d.source!r}")
    if d.source == "teacher" and not (d.prompts or d.class_labels):
        raise ConfigError("data.source 'teacher' needs data.prompts or data.class_labels to draw")
    if d.random_flip > 0 and d.cache_dir:
        raise ConfigError("data.random_flip needs uncached latents (data.cache_dir null): cached latents are fixed")
    bad_ids = {k: v for k, v in d.class_ids.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad_ids:
        raise ConfigError(f"data.class_ids maps folder names to class ids (ints >= 0), got {bad_ids}")
    if not cfg.eval.seeds and cfg.eval.enabled:
        raise ConfigError("eval.seeds must list at least one seed when eval.enabled is true")


def load_distill_config(path: Optional[str], overrides: Sequence[str] = ()) -> DistillConfig:
    """Read YAML ``path`` (``yaml.safe_load``), apply ``overrides``, check."""
    return build_distill_config(load_tree(path, overrides))


def describe() -> str:
    """Every key with its default and help, for ``--help``."""
    return "\n".join(["config keys (section.key: default  help):"] + describe_sections(SECTIONS))


__all__ = ["ConfigError", "DistillConfig", "SECTIONS", "build_distill_config", "describe", "load_distill_config"]

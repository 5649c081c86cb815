"""The sampling job's configuration: a documented schema, YAML loading and ``key=value`` overrides.

A config is plain YAML with the sections below; every key is optional except ``pipeline.model``, and an
unknown key is an error listing the valid ones. Overrides use dotted keys and YAML values:
``sampling.height=1024 sampling.seeds=[0,1,2] pipeline.adapter=null highres.enabled=true``.
Nothing in a config is executed: values are plain data. Parsing, overrides, sections, type and range checks and
the help text are the jobs' one config engine (:mod:`linvision.train.config`); each key's range is in its field
below. A single prompt, seed or label where a list is expected is read as a one-item list.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence

from linvision.dtypes import DTYPES
from linvision.train.config import (ConfigError, build_sections, describe_sections, doc_field, load_tree,
                                    section_tree)

_doc = doc_field
DTYPE_NAMES = tuple(DTYPES)  # ("float32", "float16", "bfloat16")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class PipelineConfig:
    """``pipeline:`` what to load."""

    model: Optional[str] = _doc(None, "diffusers pipeline: a hub id or a local folder (required)")
    adapter: Optional[str] = _doc(None, "linvision adapter folder or hub id (ours, or a published LinFusion one)")
    clear_checkpoint: Optional[str] = _doc(None, "a CLEAR clear_local_*.safetensors file (FLUX), instead of adapter")
    adapter_options: Dict[str, Any] = _doc({}, "CLEAR checkpoint: radius, pool_factor, train_seq_len (4608 = "
                                           "proportional attention), backend")
    dtype: str = _doc("float32", "float32, float16 or bfloat16", choices=DTYPE_NAMES)
    device: str = _doc("auto", "cpu, cuda, or auto (cuda when available)")
    scheduler_overrides: Dict[str, Any] = _doc({}, "scheduler config keys to change, e.g. {use_dynamic_shifting: false}")


@dataclass
class SamplingConfig:
    """``sampling:`` what to draw."""

    prompts: List[str] = _doc([], "text prompts (text-to-image pipelines); each is drawn once per seed")
    negative_prompt: Optional[str] = _doc(None, "negative prompt (pipelines that take one)")
    class_labels: List[int] = _doc([], "class ids (class-conditional DiT), instead of prompts", min=0)
    height: int = _doc(512, "image height in pixels: a multiple of the pipeline's latent stride", min=1)
    width: int = _doc(512, "image width in pixels: a multiple of the pipeline's latent stride", min=1)
    steps: int = _doc(25, "denoising steps", min=1)
    guidance: float = _doc(7.5, "classifier-free guidance scale (FLUX-dev: the distilled guidance)", min=0)
    seeds: List[int] = _doc([0], "one image per (prompt or label, seed)", min=0, max=2**63 - 1)
    batch_size: int = _doc(1, "images per pipeline call", min=1)
    max_sequence_length: Optional[int] = _doc(None, "text length for T5 pipelines (SD3, FLUX; CLEAR assumes 512)",
                                              min=1)


@dataclass
class MemoryConfig:
    """``memory:`` high-resolution memory switches."""

    vae_tiling: Optional[bool] = _doc(None, "VAE tiling: true, false, or null = on above tiling_pixels")
    vae_slicing: Optional[bool] = _doc(None, "VAE slicing (one image at a time): true, false, or null = on when batch > 1")
    tiling_pixels: int = _doc(1024 * 1024, "auto VAE tiling above this many output pixels", min=1)
    cfg_chunks: int = _doc(1, "LinFusion's chunked CFG: split each denoiser batch (cond + uncond) into N calls", min=1)
    ffn_chunks: int = _doc(1, "LinFusion's chunked feed-forward: run every FeedForward over N token chunks", min=1)


@dataclass
class HighresConfig:
    """``highres:`` SDEdit upscaling: draw at a base size, then upscale, re-noise and denoise, stage by stage."""

    enabled: bool = _doc(False, "use the recipe (sampling.height/width is the final size)")
    base_height: Optional[int] = _doc(None, "first-stage height (null: final / 2**stages, rounded to the stride)",
                                      min=1)
    base_width: Optional[int] = _doc(None, "first-stage width (null: final / 2**stages)", min=1)
    stages: int = _doc(1, "number of upscaling stages, each about 2x per side (LinFusion: progressive 2x)", min=1)
    strength: float = _doc(0.6, "SDEdit strength: fraction of the schedule re-run after each upscale (CLEAR: 0.7)",
                           min=0, max=1, min_open=True)
    steps: Optional[int] = _doc(None, "steps of an upscaling stage's full schedule (null: sampling.steps)", min=1)
    guidance: Optional[float] = _doc(None, "guidance in the upscaling stages (null: sampling.guidance)", min=0)
    latent_reuse: bool = _doc(True, "upsample the previous stage's latent (LinFusion); false: upsample the decoded "
                              "image and re-encode it (CLEAR, DemoFusion)")
    base_with_teacher: bool = _doc(False, "draw the first stage with the adapter uninstalled (CLEAR's recipe)")
    rope_ntk_factor: float = _doc(1.0, "FLUX: multiply the RoPE theta by this in upscaling stages (CLEAR: 10)",
                                  min=0, min_open=True)


@dataclass
class OutputConfig:
    """``output:`` where the files go."""

    dir: str = _doc("outputs/sample", "folder for the PNGs, grid.png and sample.json")
    prefix: str = _doc("image", "file name prefix of each PNG")
    grid: bool = _doc(True, "also write grid.png with every image")


SECTIONS = MappingProxyType({"pipeline": PipelineConfig, "sampling": SamplingConfig, "memory": MemoryConfig,
                             "highres": HighresConfig, "output": OutputConfig})


@dataclass
class SampleConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    highres: HighresConfig = field(default_factory=HighresConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> Dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def build(data: Any) -> SampleConfig:
    """A checked :class:`SampleConfig` from nested plain data: the jobs' one config engine (sections, types,
    ranges, unknown keys listing the valid ones), then the cross-field checks of :func:`validate`."""
    tree = section_tree(data, list(SECTIONS))
    config = SampleConfig(**build_sections(_single_items_as_lists(tree), SECTIONS))
    validate(config)
    return config


def _single_items_as_lists(tree: Mapping[str, Any]) -> Dict[str, Any]:
    """``tree`` with a single prompt / seed / label given where a list is expected as a one-item list
    (``sampling.seeds=5`` is ``[5]``); anything else is left for the engine to check."""
    out = dict(tree)
    for name, cls in SECTIONS.items():
        values = tree.get(name)
        if isinstance(values, Mapping):
            hints = typing.get_type_hints(cls)
            out[name] = {k: _as_list(v, hints[k]) if k in hints else v for k, v in values.items()}
    return out


def _as_list(value: Any, tp: Any) -> Any:
    """``[value]`` when ``tp`` is a list type and ``value`` a single str or number, else ``value``."""
    list_type = typing.get_origin(tp) in (list, List, Sequence)
    if list_type and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]
    return value


def validate(config: SampleConfig) -> None:
    """Cross-field checks; what depends on the pipeline (latent stride, class count) is checked once it loads."""
    p, s = config.pipeline, config.sampling
    if not p.model:
        raise ConfigError("pipeline.model is required (a hub id or a local pipeline folder)")
    if p.adapter and p.clear_checkpoint:
        raise ConfigError("give pipeline.adapter or pipeline.clear_checkpoint, not both")
    if p.adapter_options and not p.clear_checkpoint:
        raise ConfigError("pipeline.adapter_options apply to pipeline.clear_checkpoint only")
    if not _DEVICE.match(p.device):
        raise ConfigError(f"pipeline.device must be auto, cpu, mps, cuda or cuda:N, got {p.device!r}")
    if s.prompts and s.class_labels:
        raise ConfigError("give sampling.prompts or sampling.class_labels, not both")
    if not s.seeds:
        raise ConfigError("sampling.seeds must list at least one seed")
    if not config.output.dir:
        raise ConfigError("output.dir must be a folder name, got an empty string")
    if not config.output.prefix or any(c in config.output.prefix for c in "/\\"):
        raise ConfigError("output.prefix must be a file-name prefix without path separators, "
                          f"got {config.output.prefix!r}")


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> SampleConfig:
    """Read YAML ``path`` (``yaml.safe_load``, or start empty), apply ``section.key=value`` overrides, check."""
    return build(load_tree(path, overrides))


def describe() -> str:
    """Every section and key with its default, help and valid values, for ``--help``."""
    return "\n".join(["config keys (section.key: default  help):", *describe_sections(SECTIONS, headers=True)])


__all__ = ["ConfigError", "DTYPE_NAMES", "SECTIONS", "SampleConfig", "build", "describe", "load_config", "validate"]

"""The sampling job's configuration: a documented schema, YAML loading and ``key=value`` overrides.

A config is plain YAML with the sections below; every key is optional except ``pipeline.model``, and an
unknown key is an error listing the valid ones. Overrides use dotted keys and YAML values:
``sampling.height=1024 sampling.seeds=[0,1,2] pipeline.adapter=null highres.enabled=true``.
Nothing in a config is executed: values are plain data.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..configs import resolve_config


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _doc(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class PipelineConfig:
    """``pipeline:`` what to load."""

    model: Optional[str] = _doc(None, "diffusers pipeline: a hub id or a local folder (required)")
    adapter: Optional[str] = _doc(None, "linvision adapter folder or hub id (ours, or a published LinFusion one)")
    clear_checkpoint: Optional[str] = _doc(None, "a CLEAR clear_local_*.safetensors file (FLUX), instead of adapter")
    adapter_options: Dict[str, Any] = _doc({}, "CLEAR checkpoint: radius, pool_factor, train_seq_len (4608 = "
                                           "proportional attention), backend")
    dtype: str = _doc("float32", "float32, float16 or bfloat16")
    device: str = _doc("auto", "cpu, cuda, or auto (cuda when available)")
    scheduler_overrides: Dict[str, Any] = _doc({}, "scheduler config keys to change, e.g. {use_dynamic_shifting: false}")


@dataclass
class SamplingConfig:
    """``sampling:`` what to draw."""

    prompts: List[str] = _doc([], "text prompts (text-to-image pipelines); each is drawn once per seed")
    negative_prompt: Optional[str] = _doc(None, "negative prompt (pipelines that take one)")
    class_labels: List[int] = _doc([], "class ids (class-conditional DiT), instead of prompts")
    height: int = _doc(512, "image height in pixels: a multiple of the pipeline's latent stride")
    width: int = _doc(512, "image width in pixels: a multiple of the pipeline's latent stride")
    steps: int = _doc(25, "denoising steps")
    guidance: float = _doc(7.5, "classifier-free guidance scale (FLUX-dev: the distilled guidance)")
    seeds: List[int] = _doc([0], "one image per (prompt or label, seed)")
    batch_size: int = _doc(1, "images per pipeline call")
    max_sequence_length: Optional[int] = _doc(None, "text length for T5 pipelines (SD3, FLUX; CLEAR assumes 512)")


@dataclass
class MemoryConfig:
    """``memory:`` high-resolution memory switches."""

    vae_tiling: Optional[bool] = _doc(None, "VAE tiling: true, false, or null = on above tiling_pixels")
    vae_slicing: Optional[bool] = _doc(None, "VAE slicing (one image at a time): true, false, or null = on when batch > 1")
    tiling_pixels: int = _doc(1024 * 1024, "auto VAE tiling above this many output pixels")
    cfg_chunks: int = _doc(1, "LinFusion's chunked CFG: split each denoiser batch (cond + uncond) into N calls")
    ffn_chunks: int = _doc(1, "LinFusion's chunked feed-forward: run every FeedForward over N token chunks")


@dataclass
class HighresConfig:
    """``highres:`` SDEdit upscaling: draw at a base size, then upscale, re-noise and denoise, stage by stage."""

    enabled: bool = _doc(False, "use the recipe (sampling.height/width is the final size)")
    base_height: Optional[int] = _doc(None, "first-stage height (null: final / 2**stages, rounded to the stride)")
    base_width: Optional[int] = _doc(None, "first-stage width (null: final / 2**stages)")
    stages: int = _doc(1, "number of upscaling stages, each about 2x per side (LinFusion: progressive 2x)")
    strength: float = _doc(0.6, "SDEdit strength: fraction of the schedule re-run after each upscale (CLEAR: 0.7)")
    steps: Optional[int] = _doc(None, "steps of an upscaling stage's full schedule (null: sampling.steps)")
    guidance: Optional[float] = _doc(None, "guidance in the upscaling stages (null: sampling.guidance)")
    latent_reuse: bool = _doc(True, "upsample the previous stage's latent (LinFusion); false: upsample the decoded "
                              "image and re-encode it (CLEAR, DemoFusion)")
    base_with_teacher: bool = _doc(False, "draw the first stage with the adapter uninstalled (CLEAR's recipe)")
    rope_ntk_factor: float = _doc(1.0, "FLUX: multiply the RoPE theta by this in upscaling stages (CLEAR: 10)")


@dataclass
class OutputConfig:
    """``output:`` where the files go."""

    dir: str = _doc("outputs/sample", "folder for the PNGs, grid.png and sample.json")
    prefix: str = _doc("image", "file name prefix of each PNG")
    grid: bool = _doc(True, "also write grid.png with every image")


SECTIONS = {"pipeline": PipelineConfig, "sampling": SamplingConfig, "memory": MemoryConfig,
            "highres": HighresConfig, "output": OutputConfig}


@dataclass
class SampleConfig:
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    highres: HighresConfig = field(default_factory=HighresConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> Dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def parse_value(text: str) -> Any:
    """An override's value as YAML (``3``, ``lit``, ``null``, ``[0, 1]``); ``1e-3`` is a float."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse override value {text!r} as YAML: {err}") from None
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE") and value[0] in "+-.0123456789" else value
        except ValueError:
            return value
    return value


def _check(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _check(value, [a for a in args if a is not type(None)][0], key)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single prompt / seed / label
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def build(data: Dict[str, Any]) -> SampleConfig:
    """A checked :class:`SampleConfig` from nested plain data."""
    if not isinstance(data, dict):
        raise ConfigError("a sample config must be a mapping of sections")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; valid: {sorted(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = data.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"section {name!r} must be a mapping")
        hints = typing.get_type_hints(cls)
        bad = sorted(set(values) - set(hints))
        if bad:
            raise ConfigError(f"unknown key(s) {bad} in {name!r}; valid: {sorted(hints)}")
        sections[name] = cls(**{k: _check(v, hints[k], f"{name}.{k}") for k, v in values.items()})
    return SampleConfig(**sections)


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """``section.key=value`` strings applied to a copy of ``data``."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key.count(".") != 1:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, name = key.split(".")
        data.setdefault(section, {})
        if not isinstance(data[section], dict):
            raise ConfigError(f"section {section!r} must be a mapping")
        data[section][name] = parse_value(text)
    return data


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> SampleConfig:
    """Read YAML ``path`` (or start empty), apply ``overrides``, check, and require ``pipeline.model``."""
    data: Dict[str, Any] = {}
    if path:
        text = Path(resolve_config(path)).read_text()
        data = yaml.safe_load(text) or {}
    config = build(apply_overrides(data, overrides))
    if not config.pipeline.model:
        raise ConfigError("pipeline.model is required (a hub id or a local pipeline folder)")
    if config.pipeline.adapter and config.pipeline.clear_checkpoint:
        raise ConfigError("give pipeline.adapter or pipeline.clear_checkpoint, not both")
    s = config.sampling
    if s.prompts and s.class_labels:
        raise ConfigError("give sampling.prompts or sampling.class_labels, not both")
    for key in ("steps", "batch_size", "height", "width"):
        if getattr(s, key) < 1:
            raise ConfigError(f"sampling.{key} must be >= 1")
    if not s.seeds:
        raise ConfigError("sampling.seeds must list at least one seed")
    if config.memory.cfg_chunks < 1 or config.memory.ffn_chunks < 1:
        raise ConfigError("memory.cfg_chunks and memory.ffn_chunks must be >= 1")
    h = config.highres
    if h.enabled and not (0.0 < h.strength <= 1.0):
        raise ConfigError("highres.strength must be in (0, 1]")
    if h.enabled and h.stages < 1:
        raise ConfigError("highres.stages must be >= 1")
    return config


def describe() -> str:
    """Every section and key with its default and help, for ``--help``."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"{name}:  {(cls.__doc__ or '').replace(f'``{name}:``', '').strip()}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


__all__ = ["ConfigError", "SampleConfig", "apply_overrides", "build", "describe", "load_config", "parse_value"]

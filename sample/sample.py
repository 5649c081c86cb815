"""Draw images with a diffusers pipeline and, optionally, a linvision adapter, at any resolution.

The pipeline is a hub id or a local folder (read with ``local_files_only`` when offline); the adapter is a
folder or hub id saved by ``DiffusersAdapter.save_pretrained`` (or a published LinFusion one), or a CLEAR
``.safetensors`` for FLUX. Height and width must be multiples of the pipeline's latent stride.
Writes one PNG per image, grid.png and sample.json (settings, resolved switches, timings) to output.dir.

Examples:
  linvision sample --config configs/sample/tiny_dit.yaml
  linvision sample --config configs/sample/sd15_linfusion.yaml sampling.height=2048 sampling.width=2048
  linvision sample --config configs/sample/flux_clear.yaml highres.enabled=true output.dir=runs/flux
"""
from __future__ import annotations

import argparse
import inspect
import platform
import time
from typing import Any, Dict, List, Tuple

import torch

from linvision.diffusers.files import LOAD_ERRORS
from linvision.errors import reports_user_errors
from linvision.train.job_cli import add_config_arguments

from .config import ConfigError, SampleConfig, describe, load_config
from .dit import encode_images, sample_dit
from .highres import default_base, ntk_rope, sdedit_steps, stage_sizes, upsample_latents
from .memory import apply_vae_switches, batch_chunked, ffn_chunked, vae_switches
from .output import write_outputs
from .pipeline import check_class_labels, check_size, latent_stride, load_pipeline, vae_scale_factor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "configs/sample/tiny_dit.yaml", "sampling.height=64 output.dir=runs/sample",
                         describe(), resume=False)


@reports_user_errors("linvision sample")
def main(args: argparse.Namespace) -> int:
    """Run the job; a user error (config, pipeline, adapter, a size or label it cannot take) is one line, exit 2."""
    config = load_config(args.config, args.overrides)
    report = run(config)
    print(f"wrote {len(report['images'])} images, grid and sample.json to {config.output.dir}")
    return 0


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"pipeline.device={name} but no CUDA device is available")
    return name


def _loading(key: str, load, *args, **kwargs):
    """``load(*args, **kwargs)``, its loading errors (bad path, damaged file, mismatched weights) a ConfigError
    naming ``key``."""
    try:
        return load(*args, **kwargs)
    except ConfigError:
        raise
    except LOAD_ERRORS as err:
        raise ConfigError(f"{key}: {err}") from None


class Sampler:
    """One configured pipeline (+ adapter); :meth:`draw` makes the images of one batch."""

    def __init__(self, config: SampleConfig, progress):
        from linvision.diffusers import denoiser_of, family_of, load_clear
        from linvision.diffusers.students import load_student

        self.config = config
        self.progress = progress
        p = config.pipeline
        self.device = resolve_device(p.device)
        t0 = time.perf_counter()
        self.pipe = _loading("pipeline.model", load_pipeline, p.model, p.dtype, self.device)
        if p.scheduler_overrides:
            self.pipe.scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config, **p.scheduler_overrides)
        self.load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.adapter = None
        if p.adapter:
            self.adapter = _loading("pipeline.adapter", load_student, self.pipe, p.adapter)
            _loading("pipeline.adapter", self.adapter.install, self.pipe)
        elif p.clear_checkpoint:
            self.adapter = _loading("pipeline.clear_checkpoint", load_clear, p.clear_checkpoint, self.pipe,
                                    install=True, **p.adapter_options)
        self.adapter_s = time.perf_counter() - t0
        self.denoiser = denoiser_of(self.pipe)
        self.family = family_of(self.denoiser)
        self.stride = latent_stride(self.pipe)
        self._i2i = None

    # ------------------------------------------------------------------ plan
    def sizes(self) -> List[Tuple[int, int]]:
        s, h = self.config.sampling, self.config.highres
        final = (s.height, s.width)
        if not h.enabled:
            sizes = [final]
        else:
            base = (h.base_height or default_base(final, h.stages, self.stride)[0],
                    h.base_width or default_base(final, h.stages, self.stride)[1])
            sizes = stage_sizes(base, final, h.stages, self.stride)
        for height, width in sizes:
            try:
                check_size(self.pipe, height, width)
            except ValueError as err:
                key = "sampling.height/width" if (height, width) == final else "highres.base_height/base_width"
                raise ConfigError(f"{key}: {err}") from None
            if self.family.square_only and height != width:
                raise ConfigError(f"sampling.height/width: DiT samples square images only (diffusers unpatchifies a "
                                  f"square grid), got {height}x{width}")
        return sizes

    def steps_per_batch(self) -> int:
        s, h = self.config.sampling, self.config.highres
        if not h.enabled:
            return s.steps
        return s.steps + h.stages * sdedit_steps(h.steps or s.steps, h.strength)

    def conditions(self) -> List[Any]:
        s = self.config.sampling
        if not self.family.text:
            if s.prompts:
                raise ConfigError("sampling.prompts: DiT is class-conditional: give sampling.class_labels, not prompts")
            labels = list(s.class_labels or [0])
            try:
                check_class_labels(self.pipe, labels, "sampling.class_labels")
            except ValueError as err:
                raise ConfigError(str(err)) from None
            return labels
        if s.class_labels:
            raise ConfigError(f"sampling.class_labels: a {self.family} pipeline takes prompts, not class labels")
        if not s.prompts:
            raise ConfigError("sampling.prompts: give at least one prompt")
        return list(s.prompts)

    # ------------------------------------------------------------------ calls
    def _callback_kwargs(self, pipe) -> Dict[str, Any]:
        params = inspect.signature(pipe.__call__).parameters
        bar = self.progress
        if "callback_on_step_end" in params:
            def on_step_end(_pipe, _step, _t, kwargs):
                bar.update(1)
                return kwargs

            return {"callback_on_step_end": on_step_end}
        if "callback" in params:
            return {"callback": lambda *_: bar.update(1), "callback_steps": 1}
        return {}

    def _call(self, pipe, conds, gens, size, steps, guidance, output_type, **extra):
        s = self.config.sampling
        apply_vae_switches(self.pipe.vae, vae_switches(*size, len(conds), self.config.memory.vae_tiling,
                                                       self.config.memory.vae_slicing, self.config.memory.tiling_pixels))
        kwargs = dict(prompt=list(conds), height=size[0], width=size[1], num_inference_steps=steps,
                      guidance_scale=guidance, generator=gens, output_type=output_type,
                      use_resolution_binning=False, max_sequence_length=s.max_sequence_length, **extra)
        if s.negative_prompt is not None:
            kwargs["negative_prompt"] = [s.negative_prompt] * len(conds)
        params = inspect.signature(pipe.__call__).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in params and v is not None}
        kwargs.update(self._callback_kwargs(pipe))
        with torch.no_grad():
            out = pipe(**kwargs).images
        if output_type == "latent":
            out = self.family.unpack_latents(out, size[0], size[1], vae_scale_factor(self.pipe))
        return out

    def _dit(self, labels, gens, size, steps, guidance, output_type, init_latents=None, strength=1.0):
        apply_vae_switches(self.pipe.vae, vae_switches(*size, len(labels), self.config.memory.vae_tiling,
                                                       self.config.memory.vae_slicing, self.config.memory.tiling_pixels))
        return sample_dit(self.pipe, list(labels), size[0], size[1], steps=steps, guidance_scale=guidance,
                          generator=gens, output_type=output_type, init_latents=init_latents, strength=strength,
                          callback=lambda _i: self.progress.update(1))

    def image_to_image(self):
        if self._i2i is None:
            from diffusers import AutoPipelineForImage2Image

            try:
                self._i2i = AutoPipelineForImage2Image.from_pipe(self.pipe)
            except Exception as err:  # noqa: BLE001 - diffusers raises several types for unmapped pipelines
                raise ValueError(
                    f"highres: {type(self.pipe).__name__} has no image-to-image counterpart in diffusers ({err})"
                ) from None
            self._i2i.set_progress_bar_config(disable=True)
        return self._i2i

    def draw(self, conds: List[Any], seeds: List[int], sizes: List[Tuple[int, int]]):
        """PIL images of one batch: one stage, or the SDEdit stages of ``highres``."""
        s, h = self.config.sampling, self.config.highres
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
        dit = not self.family.text  # class-conditional DiTs sample through sample_dit
        if len(sizes) == 1:
            if dit:
                return self._dit(conds, gens, sizes[0], s.steps, s.guidance, "pil")
            return self._call(self.pipe, conds, gens, sizes[0], s.steps, s.guidance, "pil")
        reuse = h.latent_reuse
        first_type = "latent" if reuse else "pil"
        teacher = h.base_with_teacher and self.adapter is not None
        if teacher:
            self.adapter.uninstall()
        try:
            if dit:
                out = self._dit(conds, gens, sizes[0], s.steps, s.guidance, first_type)
            else:
                out = self._call(self.pipe, conds, gens, sizes[0], s.steps, s.guidance, first_type)
        finally:
            if teacher:
                self.adapter.install(self.pipe)
        steps, guidance = h.steps or s.steps, s.guidance if h.guidance is None else h.guidance
        f = vae_scale_factor(self.pipe)
        for k, size in enumerate(sizes[1:]):
            last = k == len(sizes) - 2
            out_type = "pil" if (last or not reuse) else "latent"
            if reuse:
                init = upsample_latents(out, (size[0] // f, size[1] // f))
            else:
                from PIL import Image

                init = [img.resize((size[1], size[0]), Image.BICUBIC) for img in out]
            gens = [torch.Generator().manual_seed(int(seed) + 1000 * (k + 1)) for seed in seeds]
            with ntk_rope(self.denoiser, h.rope_ntk_factor):
                if dit:
                    latents = init if reuse else encode_images(self.pipe, init)
                    out = self._dit(conds, gens, size, steps, guidance, out_type, init_latents=latents,
                                    strength=h.strength)
                else:
                    out = self._call(self.image_to_image(), conds, gens, size, steps, guidance, out_type,
                                     image=init, strength=h.strength)
        return out


def run(config: SampleConfig) -> Dict[str, Any]:
    """Run the job described by ``config``; returns the report written to ``sample.json``."""
    from tqdm.auto import tqdm

    import diffusers

    t_start = time.perf_counter()
    sampler = Sampler(config, None)
    s, mem = config.sampling, config.memory
    sizes = sampler.sizes()  # every check on the config against the pipeline, before the first step
    items = [(c, seed) for c in sampler.conditions() for seed in s.seeds]
    batches = [items[i:i + s.batch_size] for i in range(0, len(items), s.batch_size)]
    bar = sampler.progress = tqdm(total=len(batches) * sampler.steps_per_batch(), desc="sampling", unit="step",
                                  dynamic_ncols=True)
    try:
        images, records, batch_times = [], [], []
        with batch_chunked(sampler.denoiser, mem.cfg_chunks), ffn_chunked(sampler.denoiser, mem.ffn_chunks) as n_ffn:
            for batch in batches:
                t0 = time.perf_counter()
                conds, seeds = [c for c, _ in batch], [seed for _, seed in batch]
                out = sampler.draw(conds, seeds, sizes)
                batch_times.append(time.perf_counter() - t0)
                images.extend(out)
                key = "prompt" if sampler.family.text else "class_label"
                records.extend({key: c, "seed": seed, "height": s.height, "width": s.width} for c, seed in batch)
    finally:
        bar.close()
    switches = vae_switches(s.height, s.width, s.batch_size, mem.vae_tiling, mem.vae_slicing, mem.tiling_pixels)
    report = {
        "config": config.to_dict(),
        "resolved": {
            "pipeline_class": type(sampler.pipe).__name__,
            "family": sampler.family.name,
            "latent_stride": sampler.stride,
            "adapter": None if sampler.adapter is None else {
                "mechanism": sampler.adapter.config.mechanism, "layers": len(sampler.adapter.config.modules_list)},
            "stages": [list(size) for size in sizes],
            "vae": switches,
            "cfg_chunks": mem.cfg_chunks,
            "ffn_chunked_modules": n_ffn,
            "device": sampler.device,
            "dtype": config.pipeline.dtype,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()},
        },
        "timings": {
            "load_s": sampler.load_s,
            "adapter_s": sampler.adapter_s,
            "batches_s": batch_times,
            "sampling_s": sum(batch_times),
            "per_image_s": sum(batch_times) / max(len(images), 1),
            "total_s": time.perf_counter() - t_start,
        },
    }
    return write_outputs(config.output.dir, config.output.prefix, images, records, report, grid=config.output.grid)


__all__ = ["add_arguments", "main", "run"]

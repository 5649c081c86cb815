"""Train a small softmax DiT pipeline on scikit-learn's handwritten digits, offline, in minutes on a CPU.

The teacher of the distillation benchmark (``benchmarks/distill_digits.py``) and of ``linvision demo``:

1. an ``AutoencoderKL`` (2 levels, 4 latent channels, factor 2) trained to reconstruct the digits
   (8×8 grey, upsampled bicubically to ``resolution``, as RGB), its ``scaling_factor`` set to 1/std of the
   latents;
2. a ``DiTTransformer2DModel`` (patch 1, learned sigma, adaLN-Zero, diffusers' own softmax attention), or
   with ``denoiser="linvision_dit"`` a :class:`~linvision.models.dit.LinVisionDiT` of the same sizes with any
   ``mixer`` and ``mlp_layer`` (``mixer="sana", mlp_layer="glumbconv", dit_pos_embed="none"``: a SANA-style
   linear DiT), trained with the ε-prediction MSE under DDPM's linear 1000-step schedule and 10% label dropout
   (DiT's classifier-free guidance; the null class is 1000, as ``sample_dit`` assumes);
3. written as a ``DiTPipeline`` (DDIM scheduler) that ``linvision sample`` and ``linvision distill`` load.

    python -m linvision.train.digits_dit outputs/digits-dit-pipeline          # ≈ 5 min on 2 cores
    python -m linvision.train.digits_dit outputs/digits-dit-pipeline --quick  # ≈ 1 min, rougher digits
    python -m linvision.train.digits_dit outputs/digits-sana --denoiser linvision_dit --mixer sana \
        --mlp-layer glumbconv --pos-embed none                                # SANA-style linear teacher

Deterministic for a given seed (one thread recommended: ``--threads 1``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..cli_text import PlainHelpFormatter
from ..kernels.validation import check_choice, check_float
from . import rng
from .schedule import build_scheduler

DENOISERS = ("diffusers_dit", "linvision_dit")


@dataclass
class DigitsDiTSettings:
    """Sizes and schedule of the digits teacher (the defaults give recognisable 16 px digits)."""

    resolution: int = 16
    vae_channels: List[int] = None  # (16, 32)
    vae_steps: int = 300
    vae_lr: float = 2e-3
    kl_weight: float = 1e-5
    dit_layers: int = 4
    dit_heads: int = 4
    dit_head_dim: int = 16
    dit_steps: int = 2000
    dit_lr: float = 2e-3
    dit_warmup: int = 100  # linear warmup steps, then a cosine decay to 0 at the last step
    ema_decay: Optional[float] = 0.995  # EMA of the DiT weights (what is saved); None: the last weights
    batch_size: int = 32  # small batches, many steps: on 1797 images the better use of a CPU minute
    seed: int = 0
    # the denoiser: diffusers' DiTTransformer2DModel (softmax, the demo's), or linvision's DiT with these options
    denoiser: str = "diffusers_dit"
    mixer: str = "softmax"
    mixer_kwargs: Optional[Dict] = None
    mlp_layer: str = "mlp"  # or "glumbconv" (SANA's Mix-FFN)
    dit_mlp_ratio: Optional[float] = None  # None: 4 (DiT) for "mlp", 2.5 (SANA) for "glumbconv"
    dit_pos_embed: str = "sincos"  # or "none" (SANA: the Mix-FFN's conv places the tokens)

    def __post_init__(self):
        if self.vae_channels is None:
            self.vae_channels = [16, 32]
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        check_choice("denoiser", self.denoiser, DENOISERS)
        if self.denoiser == "diffusers_dit":
            custom = {"mixer": self.mixer != "softmax", "mixer_kwargs": bool(self.mixer_kwargs),
                      "mlp_layer": self.mlp_layer != "mlp", "dit_mlp_ratio": self.dit_mlp_ratio is not None,
                      "dit_pos_embed": self.dit_pos_embed != "sincos"}
            if any(custom.values()):
                raise ValueError(f"{', '.join(k for k, v in custom.items() if v)}: only with denoiser='linvision_dit'")
        else:
            from linvision.mixers import create_mixer, list_mixers
            from linvision.models.block import MLP_LAYERS
            from linvision.models.dit import POS_EMBEDS

            check_choice("mixer", self.mixer, list_mixers())
            if self.mixer_kwargs is not None and not isinstance(self.mixer_kwargs, dict):
                raise ValueError(f"mixer_kwargs must be a dict of mixer options or None, got {self.mixer_kwargs!r}")
            create_mixer(self.mixer, self.dit_heads * self.dit_head_dim, self.dit_heads, **(self.mixer_kwargs or {}))
            check_choice("mlp_layer", self.mlp_layer, MLP_LAYERS)
            check_choice("dit_pos_embed", self.dit_pos_embed, POS_EMBEDS)
            if self.dit_mlp_ratio is not None:
                check_float("dit_mlp_ratio", self.dit_mlp_ratio, min=0, min_open=True)

    @classmethod
    def quick(cls) -> "DigitsDiTSettings":
        return cls(vae_steps=300, dit_steps=800)


def digits_images(resolution: int) -> (Tensor, Tensor):
    """All 1797 digits as ``(N, 3, R, R)`` in [-1, 1] (bicubic upsampling) and their labels ``(N,)``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [np.asarray(Image.fromarray(p).resize((resolution, resolution), Image.BICUBIC).convert("RGB"),
                         dtype=np.float32) for p in pixels]
    x = torch.from_numpy(np.stack(images) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(digits.target.astype(np.int64))


def build_vae(s: DigitsDiTSettings):
    from diffusers import AutoencoderKL

    levels = len(s.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=list(s.vae_channels),
                         down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=s.resolution,
                         mid_block_add_attention=False)


def build_dit(s: DigitsDiTSettings, latent_size: int):
    """The untrained denoiser: patch 1, 4 latent channels in, ε and learned sigma out, 1000 classes + null."""
    if s.denoiser == "linvision_dit":
        from linvision.models.dit import LinVisionDiT

        ratio = s.dit_mlp_ratio if s.dit_mlp_ratio is not None else (2.5 if s.mlp_layer == "glumbconv" else 4.0)
        return LinVisionDiT(sample_size=latent_size, patch_size=1, in_channels=4, num_layers=s.dit_layers,
                            num_attention_heads=s.dit_heads, attention_head_dim=s.dit_head_dim, mixer=s.mixer,
                            mixer_kwargs=s.mixer_kwargs, mlp_layer=s.mlp_layer, mlp_ratio=ratio,
                            pos_embed=s.dit_pos_embed, num_classes=1000, class_dropout_prob=0.1)
    from linvision.diffusers.families.dit import dit_transformer

    return dit_transformer(sample_size=latent_size, num_layers=s.dit_layers, patch_size=1,
                           num_attention_heads=s.dit_heads, attention_head_dim=s.dit_head_dim)


def _batches(n: int, batch: int, generator: torch.Generator):
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch + 1, batch):
            yield order[i:i + batch]


def train_vae(vae, images: Tensor, s: DigitsDiTSettings, progress=None) -> List[float]:
    """Reconstruction MSE + ``kl_weight``·KL, AdamW; returns the loss every 50 steps."""
    g = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    batches = _batches(len(images), s.batch_size, g)
    vae.train()
    losses = []
    for step in range(s.vae_steps):
        x = images[next(batches)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        loss = F.mse_loss(vae.decode(z).sample, x) + s.kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == s.vae_steps - 1:
            losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    vae.eval()
    return losses


def train_dit(dit, latents: Tensor, labels: Tensor, scheduler, s: DigitsDiTSettings, progress=None) -> List[float]:
    """ε-prediction MSE on DDPM-noised latents (uniform timesteps), 10% label dropout (DiT's own), AdamW
    with the classification job's schedule (linear warmup from ``dit_lr / dit_warmup``, cosine to 0). With ``ema_decay`` the weights left in ``dit`` are the
    exponential moving average (decay ramped up as ``min(ema_decay, (1 + n) / (10 + n))``, DiT's recipe keeps
    an EMA too). Returns the loss (mean of each 50 steps)."""
    g = torch.Generator().manual_seed(s.seed + 1)
    torch.manual_seed(s.seed + 1)  # DiT's label dropout draws from the global generator
    opt = torch.optim.AdamW(dit.parameters(), lr=s.dit_lr, weight_decay=0.0)
    sched = build_scheduler(opt, s.dit_steps, s.dit_warmup, s.dit_lr, s.dit_lr / max(1, s.dit_warmup), 0.0)
    ema = [p.detach().clone() for p in dit.parameters()] if s.ema_decay else None
    ac = scheduler.alphas_cumprod.float()
    batches = _batches(len(latents), s.batch_size, g)
    dit.train()
    losses, window = [], []
    for step in range(s.dit_steps):
        idx = next(batches)
        x0, y = latents[idx], labels[idx]
        t = torch.randint(0, len(ac), (len(idx),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t].reshape(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = dit(xt, timestep=t, class_labels=y).sample[:, :4]
        loss = F.mse_loss(eps, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            decay = min(s.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in dit.parameters()], 1.0 - decay)
        window.append(float(loss.detach()))
        if len(window) == 50 or step == s.dit_steps - 1:
            losses.append(sum(window) / len(window))
            window = []
        if progress is not None:
            progress.update(1)
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(dit.parameters(), ema):
                p.copy_(e)
    dit.eval()
    return losses


def train_digits_dit(folder: str, settings: Optional[DigitsDiTSettings] = None, threads: Optional[int] = None,
                     progress: bool = True) -> Dict:
    """Train VAE then DiT, save the ``DiTPipeline`` to ``folder``; returns a report (also ``folder/train.json``)."""
    s = settings or DigitsDiTSettings()
    with rng.cpu_threads(threads or None):
        return _train(folder, s, progress)


def _train(folder: str, s: DigitsDiTSettings, progress: bool) -> Dict:
    from diffusers import DDIMScheduler, DiTPipeline
    from tqdm.auto import tqdm

    start = time.perf_counter()
    torch.manual_seed(s.seed)
    images, labels = digits_images(s.resolution)
    vae = build_vae(s)
    with tqdm(total=s.vae_steps + s.dit_steps, desc="digits DiT teacher", disable=not progress) as bar:
        vae_losses = train_vae(vae, images, s, bar)
        with torch.no_grad():
            mean = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        scale = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=scale)
        latents = mean * scale
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                  set_alpha_to_one=False, steps_offset=1)
        torch.manual_seed(s.seed)
        dit = build_dit(s, latents.shape[-1])
        dit_losses = train_dit(dit, latents, labels, scheduler, s, bar)
    with torch.no_grad():
        recon = vae.decode(mean[:256]).sample
    report = {"settings": asdict(s), "vae_loss": vae_losses, "dit_loss": dit_losses,
              "vae_recon_mse": float(F.mse_loss(recon, images[:256])), "scaling_factor": scale,
              "train_s": round(time.perf_counter() - start, 1)}
    DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler).save_pretrained(folder)
    Path(folder, "train.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linvision.train.digits_dit", description=__doc__,
                                     formatter_class=PlainHelpFormatter)
    parser.add_argument("folder", help="where to write the DiTPipeline")
    parser.add_argument("--quick", action="store_true", help="fewer steps (about a minute)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--denoiser", default="diffusers_dit", choices=DENOISERS)
    parser.add_argument("--mixer", default="softmax", help="linvision_dit: any registered mixer")
    parser.add_argument("--mlp-layer", default="mlp", help="linvision_dit: mlp or glumbconv")
    parser.add_argument("--pos-embed", default="sincos", help="linvision_dit: sincos or none")
    args = parser.parse_args(argv)
    try:
        settings = DigitsDiTSettings(**vars(DigitsDiTSettings.quick() if args.quick else DigitsDiTSettings()) | dict(
            seed=args.seed, denoiser=args.denoiser, mixer=args.mixer, mlp_layer=args.mlp_layer,
            dit_pos_embed=args.pos_embed))
    except ValueError as err:
        print(f"{parser.prog}: {err}", file=sys.stderr)
        return 2
    report = train_digits_dit(args.folder, settings, args.threads)
    print(json.dumps({k: report[k] for k in ("vae_recon_mse", "scaling_factor", "train_s")}
                     | {"dit_loss_last": report["dit_loss"][-1], "folder": args.folder}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

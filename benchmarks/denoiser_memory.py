"""Peak memory (and time) of one denoiser step against resolution: the teacher's attention vs linear adapters.

Builds a random-weight diffusers denoiser of a named size (no download), then for each latent size runs
one CFG-batched forward (batch 2, no autograd: the sampling case) with the teacher's own attention and
with each adapter installed, and reports the extra peak memory the step needs beyond weights and inputs
(``linvision.benchmarks.memory.peak_bytes``: CUDA allocator statistics, or tensor tracking on CPU) and
its growth from one size to the next (4x pixels per doubling of the side).

The teacher runs diffusers' SDPA (``--family sana``: SANA's own ReLU linear attention,
``SanaLinearAttnProcessor2_0``, against CLEAR and linvision's ``sana`` mixer by default). ``--sdpa math`` forces PyTorch's math backend, which materialises the
N×N attention matrix as a plain implementation does; the default backends (flash / memory-efficient, on
CPU and CUDA) keep softmax attention's memory linear in N and only its time quadratic, so the memory gap
shows against the math backend and the time gap against both.

Examples:
  python -m linvision.benchmarks.denoiser_memory                       # DiT-S/2-like, latents 16..64
  python -m linvision.benchmarks.denoiser_memory --family unet --sizes 32 64 96 --sdpa math
  python -m linvision.benchmarks.denoiser_memory --adapters linfusion lit clear --json denoiser.json
  python -m linvision.benchmarks.denoiser_memory --family sana --sizes 32 64 128 --heads 8   # 1x/2x/4x of 1024 px
"""
from __future__ import annotations

import argparse
import contextlib
import json
from typing import Dict, List

import torch

from ..cli_text import PlainHelpFormatter
from ..dtypes import DTYPES
from .memory import peak_bytes
from .timing import median_seconds

SELF_ADAPTERS = ["linfusion", "lit", "clear"]
JOINT_ADAPTERS = ["clear", "lit", "linfusion"]
FAMILY_ADAPTERS = {"sana": ["clear", "sana"]}  # families whose default comparison differs
FAMILIES = ["dit", "pixart", "unet", "sd3", "flux", "sana"]
PATCH_2 = ("dit", "pixart", "sd3", "flux")  # the benchmark models' 2x2 patches (FLUX: 2x2 packing); others patch 1


def build_denoiser(family: str, width: int, depth: int, heads: int) -> torch.nn.Module:
    """A random-weight denoiser: ``width`` channels (attention width), ``depth`` blocks, ``heads`` heads."""
    from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                           SanaTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel)

    head_dim = width // heads
    torch.manual_seed(0)
    if family == "dit":
        model = DiTTransformer2DModel(sample_size=32, num_layers=depth, patch_size=2, attention_head_dim=head_dim,
                                      num_attention_heads=heads, in_channels=4, out_channels=8, norm_type="ada_norm_zero")
    elif family == "pixart":
        model = PixArtTransformer2DModel(sample_size=32, num_layers=depth, patch_size=2, attention_head_dim=head_dim,
                                         num_attention_heads=heads, caption_channels=64, in_channels=4,
                                         cross_attention_dim=width, out_channels=8, norm_type="ada_norm_single",
                                         norm_elementwise_affine=False, num_embeds_ada_norm=1000)
    elif family == "unet":
        model = UNet2DConditionModel(block_out_channels=(width // 2, width), layers_per_block=1, sample_size=32,
                                     in_channels=4, out_channels=4, cross_attention_dim=64, attention_head_dim=heads,
                                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    elif family == "sd3":
        model = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=4, num_layers=depth,
                                      attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
                                      caption_projection_dim=width, pooled_projection_dim=64, out_channels=4,
                                      pos_embed_max_size=256)
    elif family == "flux":
        model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=max(depth // 2, 1),
                                       num_single_layers=max(depth // 2, 1), attention_head_dim=head_dim,
                                       num_attention_heads=heads, joint_attention_dim=64, pooled_projection_dim=64,
                                       axes_dims_rope=[head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8])
    elif family == "sana":  # 32 latent channels (DC-AE f32c32), patch 1, GLUMBConv, SDPA cross-attention
        model = SanaTransformer2DModel(in_channels=32, out_channels=32, num_attention_heads=heads,
                                       attention_head_dim=head_dim, num_layers=depth, num_cross_attention_heads=heads,
                                       cross_attention_head_dim=head_dim, cross_attention_dim=width, caption_channels=64,
                                       sample_size=32, patch_size=1)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return model.eval()


def step_inputs(family: str, model: torch.nn.Module, size: int, batch: int = 2, text: int = 16) -> Dict:
    """Keyword arguments of one denoiser call on a ``size``×``size`` latent (FLUX: packed 2×2, so size/2 tokens)."""
    g = torch.Generator().manual_seed(0)
    p = next(model.parameters())
    t = torch.full((batch,), 500, dtype=torch.long)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=p.device, dtype=p.dtype)

    if family == "dit":
        return {"hidden_states": rand(batch, 4, size, size), "timestep": t.to(p.device),
                "class_labels": torch.arange(batch, device=p.device)}
    if family == "pixart":
        return {"hidden_states": rand(batch, 4, size, size), "encoder_hidden_states": rand(batch, text, 64),
                "timestep": t.to(p.device), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    if family == "unet":
        return {"sample": rand(batch, 4, size, size), "timestep": t.to(p.device), "encoder_hidden_states": rand(batch, text, 64)}
    if family == "sana":
        return {"hidden_states": rand(batch, 32, size, size), "encoder_hidden_states": rand(batch, text, 64),
                "timestep": t.to(p.device)}
    if family == "sd3":
        return {"hidden_states": rand(batch, 4, size, size), "encoder_hidden_states": rand(batch, text, 64),
                "pooled_projections": rand(batch, 64), "timestep": t.to(p.device)}
    side = size // 2
    ids = torch.zeros(side, side, 3, device=p.device)
    ids[..., 1] = torch.arange(side, device=p.device)[:, None]
    ids[..., 2] = torch.arange(side, device=p.device)[None]
    return {"hidden_states": rand(batch, side * side, 16), "encoder_hidden_states": rand(batch, text, 64),
            "pooled_projections": rand(batch, 64), "timestep": (t.float() / 1000).to(p.device),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(text, 3, device=p.device)}


def sdpa_context(kind: str):
    if kind == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def measure(model, kwargs, device, repeat: int) -> Dict[str, float]:
    """Extra peak MiB and median ms of one no-grad forward."""
    def step():
        with torch.no_grad():
            model(**kwargs)

    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    existing = [*model.parameters(), *model.buffers(), *tensors]
    peak = peak_bytes(step, existing, device)
    seconds = median_seconds(step, device, repeat=repeat)
    return {"peak_mib": peak / 2**20, "ms": seconds * 1e3}


def denoiser_step_memory(family: str = "dit", sizes=(16, 32, 64), adapters=None, width: int = 256, depth: int = 4,
                         heads: int = 4, device: str = "cpu", dtype: torch.dtype = torch.float32, sdpa: str = "default",
                         repeat: int = 1, options: Dict = None) -> List[Dict]:
    """Rows ``{variant, size, tokens, peak_mib, ms}``: the teacher (``"softmax"``; ``"sana-own"`` for SANA's
    own linear attention) first at each size, then one per adapter."""
    from linvision.diffusers import DiffusersAdapter, family_of

    dev = torch.device(device)
    model = torch.nn.Module.to(build_denoiser(family, width, depth, heads), device=dev, dtype=dtype)
    joint = family_of(model).kind == "joint"
    adapters = list(adapters or FAMILY_ADAPTERS.get(family) or (JOINT_ADAPTERS if joint else SELF_ADAPTERS))
    teacher = "sana-own" if family == "sana" else "softmax"
    options = options or {}
    rows = []
    for size in sizes:
        kwargs = step_inputs(family, model, size)
        tokens = (size // 2) ** 2 if family in PATCH_2 else size * size
        with sdpa_context(sdpa):
            rows.append({"variant": teacher, "size": size, "tokens": tokens, **measure(model, kwargs, dev, repeat)})
        for name in adapters:
            adapter = DiffusersAdapter.construct_for(model, name, **options.get(name, {}))
            try:
                rows.append({"variant": name, "size": size, "tokens": tokens, **measure(model, kwargs, dev, repeat)})
            finally:
                adapter.uninstall()
    return rows


def print_table(rows: List[Dict]) -> None:
    previous: Dict[str, Dict] = {}
    header = f"{'latent':>7} {'tokens':>7} {'variant':>10} {'peak MiB':>10} {'growth':>7} {'ms':>9} {'vs teacher':>11}"
    print(header)
    print("-" * len(header))
    teacher = {}
    for r in rows:  # the first row of each size is the teacher's
        teacher.setdefault(r["size"], r)
    for r in rows:
        prev = previous.get(r["variant"])
        growth = f"{r['peak_mib'] / prev['peak_mib']:.2f}x" if prev and prev["peak_mib"] else "-"
        ref = teacher[r["size"]]
        ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref["peak_mib"] else "-"
        print(f"{r['size']:>7} {r['tokens']:>7} {r['variant']:>10} {r['peak_mib']:>10.1f} {growth:>7} {r['ms']:>9.1f} {ratio:>11}")
        previous[r["variant"]] = r


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="dit", choices=FAMILIES)
    parser.add_argument("--sizes", nargs="+", type=int, default=[16, 32, 64], help="latent side (default: 16 32 64)")
    parser.add_argument("--adapters", nargs="+", default=None,
                        help="mechanisms (default: linfusion lit clear; sana family: clear sana)")
    parser.add_argument("--width", type=int, default=256, help="attention channels (default: 256)")
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks (default: 4)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--sdpa", choices=["default", "math"], default="default",
                        help="teacher attention backend: PyTorch's choice, or the N×N math path")
    parser.add_argument("--radius", type=int, default=4, help="CLEAR window radius in tokens (default: 4)")
    parser.add_argument("--repeat", type=int, default=1, help="timed runs per case (median; default 1)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")


def main(args: argparse.Namespace) -> int:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    print(f"family={args.family} width={args.width} depth={args.depth} heads={args.heads} device={device} "
          f"dtype={str(dtype).replace('torch.', '')} sdpa={args.sdpa} batch=2 (CFG)")
    rows = denoiser_step_memory(args.family, args.sizes, args.adapters, args.width, args.depth, args.heads, device,
                                dtype, args.sdpa, args.repeat, {"clear": {"radius": args.radius}})
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m linvision.benchmarks.denoiser_memory", description=__doc__,
                                     formatter_class=PlainHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))

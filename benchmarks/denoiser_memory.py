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
from .memory import peak_bytes
from .timing import median_seconds

SELF_ADAPTERS = ["linfusion", "lit", "clear"]
JOINT_ADAPTERS = ["clear", "lit", "linfusion"]
FAMILY_ADAPTERS = {"sana": ["clear", "sana"]}  # families whose default comparison differs
FAMILIES = ["dit", "pixart", "unet", "sd3", "flux", "sana"]  # the adapter families (their random_denoiser sizes)


def build_denoiser(family: str, width: int, depth: int, heads: int) -> torch.nn.Module:
    """A random-weight denoiser: ``width`` channels (attention width), ``depth`` blocks, ``heads`` heads (the
    family's ``random_denoiser``: patch 2 for DiT/PixArt/SD3, FLUX's 2x2 packing, patch 1 for SANA)."""
    from linvision.diffusers import family_named

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family_named(family).random_denoiser(width, depth, heads)


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
    kind = family_of(model)
    joint = kind.kind == "joint"
    adapters = list(adapters or FAMILY_ADAPTERS.get(family) or (JOINT_ADAPTERS if joint else SELF_ADAPTERS))
    teacher = kind.native_attention
    options = options or {}
    rows = []
    for size in sizes:
        kwargs = kind.example_inputs(model, size)
        tokens = (size // kind.latent_stride(1, model)) ** 2  # top-level image tokens
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


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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

"""Side-by-side speed and peak memory of every registered mixer against softmax attention.

For each resolution (h = w = size, so size² image tokens) and each mixer, builds the mixer with its
defaults at ``--dim``/``--heads``, times the forward (``--mode forward``, no autograd, the sampling
case) or forward + backward (``--mode train``), and measures the extra peak memory the call needs
beyond its input and weights. Ratios are against softmax (SDPA) measured in the same run.

On CUDA it also times the bidirectional linear-attention kernel (Triton against the PyTorch
reference and SDPA) and reports its achieved bandwidth against the bytes it must move: read Q, K,
V once and write O once.

Examples:
  linvision bench                                  # all mixers, 32² to 128² tokens
  linvision bench --mixers softmax linear --sizes 64 128 --dim 256 --heads 4
  linvision bench --quick                          # a few seconds, small sizes
  linvision bench --growth                         # time(4N)/time(N) per mixer at 64², 128², 256²;
                                                   # exits 1 when a linear-cost mixer grows faster;
                                                   # softmax forms stop at 128² unless named with --mixers
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Dict, List

import torch

from ..cli_text import PlainHelpFormatter
from ..dtypes import DTYPES
from ..mixers import create_mixer, list_mixers
from .growth import (
    CLOCKS, GROWTH_LIMIT, GROWTH_REPEAT, GROWTH_SIZES, QUADRATIC_MAX_SIZE, growth_failures, growth_ratios, growth_sizes, measure_growth,
    print_growth,
)
from .linfusion_official import compare_official_linfusion
from .memory import peak_bytes
from .timing import median_seconds



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mixers", nargs="+", default=None, help="mixers to run (default: all registered)")
    parser.add_argument("--sizes", nargs="+", type=int, default=None,
                        help="grid side h = w (default: 32 64 128; with --growth 64 128 256)")
    parser.add_argument("--dim", type=int, default=256, help="channels C (default: 256)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--mode", choices=["forward", "train"], default="forward", help="forward only, or forward+backward")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per case: the median is reported (default: 3); with --growth, side-by-side "
                             f"rounds, each sample as many tokens at every size, the fastest reported (default: "
                             f"{GROWTH_REPEAT})")
    parser.add_argument("--quick", action="store_true", help="sizes 16 and 32, one timed run: a smoke run")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON to PATH")
    parser.add_argument("--growth", action="store_true",
                        help="forward time and peak-memory growth per size step, side by side; exit 1 when a "
                             "linear-cost mixer exceeds --growth-limit (quadratic-cost mixers stop at "
                             f"{QUADRATIC_MAX_SIZE}² unless named with --mixers)")
    parser.add_argument("--growth-limit", type=float, default=GROWTH_LIMIT,
                        help=f"allowed time(4N)/time(N) of a linear-cost mixer (default: {GROWTH_LIMIT})")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or this process's CPU time (steadier on a shared machine; default: wall)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def bench_mixer(name: str, size: int, args, device: torch.device, dtype: torch.dtype) -> Dict:
    torch.manual_seed(0)
    mixer = create_mixer(name, dim=args.dim, num_heads=args.heads).to(device=device, dtype=dtype)
    x = torch.randn(args.batch, size * size, args.dim, device=device, dtype=dtype)
    hw = (size, size)
    if args.mode == "train":
        x.requires_grad_(True)

        def step():
            mixer(x, hw).float().sum().backward()
            x.grad = None
            mixer.zero_grad(set_to_none=True)

        existing = [x, *mixer.parameters()]
        run = step
    else:

        def run():
            with torch.no_grad():
                mixer(x, hw)

        existing = [x, *mixer.parameters()]
    seconds = median_seconds(run, device, repeat=args.repeat)
    peak = peak_bytes(run, existing, device)
    return {"mixer": name, "size": size, "tokens": size * size, "ms": seconds * 1e3, "peak_mib": peak / 2**20}


def print_table(rows: List[Dict]) -> None:
    base = {r["size"]: r for r in rows if r["mixer"] == "softmax"}
    header = f"{'tokens':>8} {'mixer':>10} {'ms':>10} {'peak MiB':>10} {'speed vs softmax':>17} {'memory vs softmax':>18}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ref = base.get(r["size"])
        speed = f"{ref['ms'] / r['ms']:.2f}x" if ref else "-"
        memory = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref and ref["peak_mib"] else "-"
        print(f"{r['tokens']:>8} {r['mixer']:>10} {r['ms']:>10.2f} {r['peak_mib']:>10.1f} {speed:>17} {memory:>18}")


def bench_kernel(args, device: torch.device, dtype: torch.dtype) -> List[Dict]:
    """CUDA only: the linear-attention kernel against its reference and SDPA, with achieved GB/s."""
    import torch.nn.functional as F

    from ..kernels.linear_attn import linear_attention

    rows = []
    B, H = args.batch, args.heads
    D = args.dim // args.heads
    for size in args.sizes:
        N = size * size
        q, k, v = (torch.rand(B, N, H, D, device=device, dtype=dtype) for _ in range(3))
        moved = 4 * B * N * H * D * q.element_size()  # read Q, K, V once, write O once
        row = {"tokens": N, "bytes_mb": moved / 1e6}
        for backend in ("triton", "torch"):
            s = median_seconds(lambda: linear_attention(q, k, v, backend=backend), device, repeat=max(args.repeat, 10))
            row[f"{backend}_ms"] = s * 1e3
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        s = median_seconds(lambda: F.scaled_dot_product_attention(qt, kt, vt), device, repeat=max(args.repeat, 10))
        row["sdpa_ms"] = s * 1e3
        row["triton_gbps"] = moved / (row["triton_ms"] * 1e-3) / 1e9
        rows.append(row)
    print(f"\nlinear_attention kernel, B={B} H={H} D={D} {str(dtype).replace('torch.', '')}")
    print(f"{'tokens':>8} {'MB moved':>9} {'triton ms':>10} {'GB/s':>8} {'torch ms':>9} {'sdpa ms':>9} {'vs torch':>9} {'vs sdpa':>8}")
    for r in rows:
        print(
            f"{r['tokens']:>8} {r['bytes_mb']:>9.1f} {r['triton_ms']:>10.3f} {r['triton_gbps']:>8.0f} {r['torch_ms']:>9.3f}"
            f" {r['sdpa_ms']:>9.3f} {r['torch_ms'] / r['triton_ms']:>8.1f}x {r['sdpa_ms'] / r['triton_ms']:>7.1f}x"
        )
    return rows


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads is not None:
        if args.threads < 1:
            print(f"linvision bench: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if args.repeat is not None and args.repeat < 1:
        print(f"linvision bench: --repeat must be >= 1, got {args.repeat}", file=sys.stderr)
        return 2
    if args.repeat is None:
        args.repeat = GROWTH_REPEAT if args.growth else 3
    if args.sizes is None:
        args.sizes = GROWTH_SIZES if args.growth else [32, 64, 128]
    if args.quick:
        args.sizes, args.repeat = [16, 32], 1
    names = args.mixers or list_mixers()
    unknown = sorted(set(names) - set(list_mixers()))
    if unknown:
        raise SystemExit(f"unknown mixer(s) {unknown}; available: {', '.join(list_mixers())}")
    print(
        f"device={device} dtype={str(dtype).replace('torch.', '')} mode={args.mode} dim={args.dim} "
        f"heads={args.heads} batch={args.batch} threads={torch.get_num_threads()}"
    )
    if args.growth:
        return growth_main(names, args, device, dtype)
    names = ["softmax"] + [n for n in names if n != "softmax"]
    rows = []
    cases = [(size, name) for size in args.sizes for name in names]
    # a progress bar on a terminal only: redirected to a log, its carriage-return redraws would be residue
    for size, name in tqdm(cases, desc="bench", unit="case", leave=False, disable=not sys.stderr.isatty()):
        rows.append(bench_mixer(name, size, args, device, dtype))
    print_table(rows)
    kernel_rows = bench_kernel(args, device, dtype) if device.type == "cuda" else []
    official_rows = compare_official_linfusion(args.sizes, args, device, dtype) if "linfusion" in names else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mixers": rows, "kernel": kernel_rows, "linfusion_official": official_rows}, f, indent=1)
    ok = all(math.isfinite(r["ms"]) for r in rows)
    return 0 if ok else 1


def growth_main(names: List[str], args, device: torch.device, dtype: torch.dtype) -> int:
    """``--growth``: the growth table, the official LinFusion comparison, exit 1 on a failed linear mixer."""
    sizes = sorted(args.sizes)
    print(f"growth: sizes {sizes}, fastest of {args.repeat} side-by-side rounds (a sample: as many tokens at every "
          f"size), {args.clock} clock, forward, no_grad")
    rows = measure_growth(names, sizes, args, device, dtype, named=args.mixers is not None)
    capped = sorted({n for n in names if growth_sizes(n, sizes, args.mixers is not None) != sizes})
    if capped:
        print(f"growth: quadratic-cost {', '.join(capped)} run up to {QUADRATIC_MAX_SIZE}² only "
              "(name them with --mixers for every size)")
    ratios = growth_ratios(rows)
    print_growth(rows, ratios, args.growth_limit)
    official_rows = compare_official_linfusion(sizes, args, device, dtype) if "linfusion" in names else []
    failures = growth_failures(ratios, args.growth_limit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"growth": rows, "ratios": ratios, "failures": failures, "linfusion_official": official_rows}, f, indent=1)
    for line in failures:
        print(f"FAIL {line}")
    print("growth: every linear-cost mixer within the limit" if not failures else f"growth: {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=PlainHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))

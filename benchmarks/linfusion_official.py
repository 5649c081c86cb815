"""linvision's LinFusion against the official module, same weights, side by side (``linvision bench``).

The official ``Huage001/LinFusion`` package (``src/linfusion/attention.py::GeneralizedLinearAttention``)
is not a dependency: the comparison runs when ``linfusion.attention`` is importable (e.g. a checkout's
``src`` on ``PYTHONPATH``) and is skipped with a printed line otherwise. The official module is built as
``LinFusion.__init__`` builds it; its state dict loads into :class:`linvision.mixers.linfusion.LinFusionAttention`
unchanged (the mixer keeps the official parameter names).
"""
from __future__ import annotations

import importlib
import statistics
import time
from typing import Dict, List, Optional

import torch

from ..mixers import create_mixer


def official_linfusion_class() -> Optional[type]:
    """``GeneralizedLinearAttention`` from an importable official ``linfusion`` package, else None."""
    try:
        return importlib.import_module("linfusion.attention").GeneralizedLinearAttention
    except Exception:  # not installed, or its own imports fail: nothing to compare against
        return None


def compare_official_linfusion(sizes, args, device, dtype) -> List[Dict]:
    """Rows ``{tokens, official_ms, linvision_ms, speedup, max_abs_diff}``; prints a table or a skip line."""
    official = official_linfusion_class()
    if official is None:
        print("\nLinFusion vs official: skipped (the official `linfusion` package is not importable)")
        return []
    torch.manual_seed(0)
    ref = official(query_dim=args.dim, out_dim=args.dim, dim_head=args.dim // args.heads).to(device, dtype).eval()
    ours = create_mixer("linfusion", dim=args.dim, num_heads=args.heads).to(device, dtype).eval()
    ours.load_state_dict(ref.state_dict())
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    with torch.no_grad():
        for size in sizes:
            x = torch.randn(args.batch, size * size, args.dim, device=device, dtype=dtype)
            runs = {"official": lambda: ref(x), "linvision": lambda: ours(x, (size, size))}
            outs = {name: run() for name, run in runs.items()}  # warm-up, and the outputs compared
            times: Dict[str, List[float]] = {name: [] for name in runs}
            for _ in range(args.repeat):
                for name, run in runs.items():
                    sync()
                    start = time.perf_counter()
                    run()
                    sync()
                    times[name].append(time.perf_counter() - start)
            med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
            diff = (outs["official"].float() - outs["linvision"].float()).abs().max().item()
            rows.append({"tokens": size * size, "official_ms": med["official"], "linvision_ms": med["linvision"],
                         "speedup": med["official"] / med["linvision"], "max_abs_diff": diff})
    print(f"\nLinFusion vs official GeneralizedLinearAttention (same weights), dim={args.dim} heads={args.heads}")
    print(f"{'tokens':>8} {'official ms':>12} {'linvision ms':>13} {'speed-up':>9} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['tokens']:>8} {r['official_ms']:>12.2f} {r['linvision_ms']:>13.2f} {r['speedup']:>8.2f}x {r['max_abs_diff']:>11.2e}")
    return rows

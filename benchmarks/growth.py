"""Growth of time and peak memory with the token count: ``linvision bench --growth``.

Every ``(mixer, size)`` case is built first, then timed side by side: each of ``repeat`` rounds times
every case once (after one warm-up round), so a load that changes during the run touches every case
alike; a mixer's sizes run one after another, ascending in even rounds and descending in odd ones. A case's sample is as many back-to-back calls as make the tokens of one call at the mixer's largest
size (16 calls at 64², 4 at 128², 1 at 256²), divided by the calls: every sample lasts about as long, so an
intermittent interruption of the machine (a neighbour's burst of CPU or memory
traffic) is as likely to land in a small case's sample as in a large one's, where with one call per sample
the short samples of the small sizes slip between the interruptions and the ratios come out too high.
The fastest round of each case is reported (``ms``; the median and every round are kept in the rows):
interference only ever adds time, while what makes a mixer super-linear (a temporary past the cache, a
page-faulted fresh allocation) is in every round, the fastest too. For each pair of consecutive sizes the table gives
``time(N₂)/time(N₁)`` and ``peak(N₂)/peak(N₁)``; with sizes doubling (64, 128, 256) that is
``time(4N)/time(N)``, 4 for exactly linear cost. A mixer class declares ``linear_cost``
(:class:`linvision.mixers.TokenMixer`); a linear-cost mixer fails when a ratio exceeds the limit
scaled to the token ratio (``limit · (N₂/N₁)/4``; 4.5 by default).

Quadratic-cost mixers (softmax, nala_softmax) are run up to :data:`QUADRATIC_MAX_SIZE`² tokens only, unless
named with ``--mixers``: at 256² (65,536 tokens, dim 256) one forward of dense attention takes tens of
seconds on a CPU, and their growth is never checked (only linear-cost mixers can fail).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..mixers import create_mixer, mixer_class
from .memory import peak_bytes

GROWTH_LIMIT = 4.5  # allowed time(4N)/time(N) (and peak(4N)/peak(N)) of a linear-cost mixer
GROWTH_SIZES = [64, 128, 256]
GROWTH_REPEAT = 9  # side-by-side rounds by default: on a shared 2-core VM, where one case's rounds differ by up to
# 50 %, the fastest of 5 moved a step's ratio by ±10 % from run to run; 9 (about 18 minutes for every mixer there)
# narrow that, though slow phases of several minutes still move a step by a few per cent
QUADRATIC_MAX_SIZE = 128  # grid side past which quadratic-cost mixers run only when named explicitly


def growth_sizes(name: str, sizes: Sequence[int], named: bool) -> List[int]:
    """The sizes ``name`` is run at: all of them for a linear-cost or explicitly named mixer, else those up
    to :data:`QUADRATIC_MAX_SIZE`."""
    if named or mixer_class(name).linear_cost:
        return list(sizes)
    return [s for s in sizes if s <= QUADRATIC_MAX_SIZE]
CLOCKS: Dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def round_order(cases: Sequence[Tuple], round_: int) -> List[int]:
    """The order of the case indices in round ``round_``: mixer by mixer as built, each mixer's sizes ascending in
    even rounds and descending in odd ones, so no size of a mixer always runs first after another mixer's cases
    (``cases`` rows start ``(mixer, size, ...)``, a mixer's rows adjacent)."""
    order: List[int] = []
    for i, case in enumerate(cases):
        if order and cases[order[-1]][0] == case[0] and round_ % 2:
            start = next(j for j, k in enumerate(order) if cases[k][0] == case[0])
            order.insert(start, i)
        else:
            order.append(i)
    return order


def measure_growth(names: Sequence[str], sizes: Sequence[int], args, device, dtype, named: bool = True) -> List[Dict]:
    """Fastest and median milliseconds (side by side, ``args.repeat`` rounds on ``args.clock``) and extra peak
    bytes of every mixer's forward (no autograd) at its sizes (:func:`growth_sizes`; ``named``: the mixers were
    named by the user); rows ``{mixer, size, tokens, ms, median_ms, runs_ms, peak_mib}``."""
    clock = CLOCKS[args.clock]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    cases: List[Tuple[str, int, Callable[[], object], list, int]] = []
    for name in names:
        torch.manual_seed(0)
        mixer = create_mixer(name, dim=args.dim, num_heads=args.heads).to(device=device, dtype=dtype).eval()
        mixer_sizes = growth_sizes(name, sizes, named)
        for size in mixer_sizes:
            x = torch.randn(args.batch, size * size, args.dim, device=device, dtype=dtype)

            def run(mixer=mixer, x=x, hw=(size, size)):
                with torch.no_grad():
                    mixer(x, hw)

            calls = max(1, round(max(mixer_sizes) ** 2 / size**2))  # a sample spans as many tokens at every size
            cases.append((name, size, run, [x, *mixer.parameters()], calls))
    times: List[List[float]] = [[] for _ in cases]
    for round_ in range(args.repeat + 1):  # round 0 warms up
        for i in round_order(cases, round_):
            _, _, run, _, calls = cases[i]
            calls = calls if round_ else 1
            sync()
            start = clock()
            for _ in range(calls):
                run()
            sync()
            if round_:
                times[i].append((clock() - start) / calls)
    return [
        {"mixer": name, "size": size, "tokens": size * size, "ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3,
         "runs_ms": [round(s * 1e3, 2) for s in t], "peak_mib": peak_bytes(run, existing, device) / 2**20}
        for (name, size, run, existing, _), t in zip(cases, times)
    ]


def growth_ratios(rows: List[Dict]) -> Dict[str, List[Dict]]:
    """Per mixer, for consecutive sizes: ``{tokens, to_tokens, time, memory}`` ratios (memory None if 0)."""
    by_mixer: Dict[str, List[Dict]] = {}
    for r in rows:
        by_mixer.setdefault(r["mixer"], []).append(r)
    out = {}
    for name, rs in by_mixer.items():
        rs = sorted(rs, key=lambda r: r["tokens"])
        out[name] = [
            {"tokens": a["tokens"], "to_tokens": b["tokens"], "time": b["ms"] / a["ms"],
             "memory": b["peak_mib"] / a["peak_mib"] if a["peak_mib"] > 0 else None}
            for a, b in zip(rs, rs[1:])
        ]
    return out


def growth_failures(ratios: Dict[str, List[Dict]], limit: float = GROWTH_LIMIT) -> List[str]:
    """One line per ratio of a linear-cost mixer above ``limit · (N₂/N₁)/4``; empty when all hold."""
    failures = []
    for name, steps in ratios.items():
        if not mixer_class(name).linear_cost:
            continue
        for s in steps:
            allowed = limit * s["to_tokens"] / s["tokens"] / 4
            for kind in ("time", "memory"):
                if s[kind] is not None and s[kind] > allowed:
                    failures.append(
                        f"{name}: {kind} grows {s[kind]:.2f}x from {s['tokens']} to {s['to_tokens']} tokens "
                        f"(linear-cost limit {allowed:.2f}x)"
                    )
    return failures


def print_growth(rows: List[Dict], ratios: Dict[str, List[Dict]], limit: float) -> None:
    """The table: ms per size and the time/memory ratio per size step; ``-`` where a mixer was not run."""
    sizes = sorted({r["size"] for r in rows})
    ms = {(r["mixer"], r["size"]): r for r in rows}
    pairs = list(zip(sizes, sizes[1:]))
    steps = [f"{a}²→{b}²" for a, b in pairs]
    header = (f"{'mixer':>12} {'linear':>6} " + " ".join(f"{f'ms {s}²':>10}" for s in sizes) + " "
              + " ".join(f"{'time ' + s:>16}" for s in steps) + " " + " ".join(f"{'mem ' + s:>15}" for s in steps))
    print(header)
    print("-" * len(header))
    for name, st in ratios.items():
        linear = mixer_class(name).linear_cost
        times = " ".join(f"{ms[(name, s)]['ms']:>10.1f}" if (name, s) in ms else f"{'-':>10}" for s in sizes)
        by_step = {(s["tokens"], s["to_tokens"]): s for s in st}
        aligned = [by_step.get((a * a, b * b)) for a, b in pairs]

        def mark(step, kind):
            value = None if step is None else step[kind]
            if value is None:
                return "-"
            bad = linear and value > limit * step["to_tokens"] / step["tokens"] / 4
            return f"{value:.2f}x" + (" !" if bad else "")

        tr = " ".join(f"{mark(s, 'time'):>16}" for s in aligned)
        mr = " ".join(f"{mark(s, 'memory'):>15}" for s in aligned)
        print(f"{name:>12} {'yes' if linear else 'no':>6} {times} {tr} {mr}")

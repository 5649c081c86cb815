"""Accuracy counting, the per-epoch ``metrics.jsonl`` log and its loss/accuracy plot.

``metrics.jsonl`` has one JSON object per completed epoch: ``epoch`` (1-based), ``step`` (global optimizer
steps), ``lr``, ``train_loss``, ``val_loss``, ``val_top1``, ``val_top5`` (percent), the same three with an
``ema_`` prefix when the EMA is on, ``epoch_time_s`` and ``images_per_s`` (training throughput over all
processes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch

from .checkpoint import atomic_write


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> torch.Tensor:
    """How many rows of ``logits`` have ``target`` among their top-k classes, for each k (k is capped at the
    number of classes): an int64 tensor of ``len(ks)`` counts on the logits' device (no host sync)."""
    kmax = min(max(ks), logits.shape[-1])
    hits = logits.topk(kmax, dim=-1).indices.eq(target.unsqueeze(-1))
    return torch.stack([hits[:, : min(k, kmax)].any(dim=-1).sum() for k in ks])


class MetricsLog:
    """Append-only JSON-lines log in ``path``; :meth:`truncate` drops epochs a resumed run will redo."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def read(self) -> List[Dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, completed: int, key: str = "epoch") -> None:
        """Keep only the records whose ``key`` (epoch, or step for step-based jobs) is ``<= completed`` (atomically)."""
        kept = [r for r in self.read() if r.get(key, 0) <= completed]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))

    def append(self, record: Dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def plot_metrics(records: Sequence[Dict[str, Any]], path: Path) -> None:
    """Loss (train/val/EMA val) and top-1 (val/EMA val) against epoch, as a PNG written atomically.

    Uses matplotlib's object API with the Agg canvas, so no global backend is selected or changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    for key, label in (("train_loss", "train"), ("val_loss", "val"), ("ema_val_loss", "val (EMA)")):
        if records and key in records[0]:
            ax_loss.plot(epochs, [r[key] for r in records], marker="o", label=label)
    for key, label in (("val_top1", "val top-1"), ("ema_val_top1", "val top-1 (EMA)"), ("val_top5", "val top-5")):
        if records and key in records[0]:
            ax_acc.plot(epochs, [r[key] for r in records], marker="o", label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def plot_series(panels: Sequence[Tuple[str, Sequence[Dict[str, Any]], Sequence[str]]], path: Path, x: str = "step",
                log_y: bool = True) -> None:
    """One subplot per ``(title, records, keys)``: each key present in the records against ``x``; PNG written
    atomically (Agg canvas, no global matplotlib state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(panels), 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, records, keys) in zip(axes, panels):
        for key in keys:
            points = [(r[x], r[key]) for r in records if key in r and r[key] is not None]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=key)
        if log_y and ax.lines and all(v > 0 for line in ax.lines for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.set(xlabel=x, title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


__all__ = ["MetricsLog", "plot_metrics", "plot_series", "topk_correct"]

"""The CPU peak-memory tracker used by the benchmark counts what is alive at once, not what was allocated."""
import torch

from linvision.benchmarks.memory import PeakTensorMemory


def test_peak_counts_live_tensors_only():
    x = torch.randn(256, 256)  # 256 KiB, existing before: not counted
    with PeakTensorMemory([x]) as tracker:
        for _ in range(4):
            y = x @ x  # 256 KiB
            z = y + 1  # 256 KiB, alive together with y
            del y, z
    assert tracker.peak == 2 * 256 * 256 * 4
    assert tracker.current == 0


def test_views_share_their_storage():
    x = torch.randn(64, 64)
    with PeakTensorMemory([x]) as tracker:
        y = x * 2
        views = [y.t(), y[1:], y.view(-1)]
    assert tracker.peak == 64 * 64 * 4 and len(views) == 3

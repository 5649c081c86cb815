"""Shared test helpers."""
import pytest
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in fp64."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the jobs' ``train.threads`` must not leak into later tests).
    Autouse in every module that imports it."""
    from linvision.train.rng import cpu_threads

    with cpu_threads(1):
        yield

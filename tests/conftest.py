"""Test setup: Triton's CPU interpreter, NaN-poisoned ``torch.empty``, offline hubs."""
import os

# Must be set before triton is imported anywhere: CPU tests run Triton kernels interpreted.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


try:  # `with torch.device(...)` recognises factories by identity, from a set built once: build it from the
    # real torch.empty/empty_like now, before poison_empty patches them (else meta-device builds land on CPU)
    from torch.utils._device import _device_constructors

    _device_constructors()
except (ImportError, AttributeError):  # pragma: no cover - other torch versions
    pass


def _nan_filled(factory):
    def make(*args, **kwargs):
        out = factory(*args, **kwargs)
        if out.is_floating_point() or out.is_complex():
            out.fill_(float("nan"))
        return out

    return make


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "golden: compares with a tensor file in tests/fixtures made on another machine (tolerances only; "
        ".ci/run reruns these under ATEN_CPU_CAPABILITY=default)")


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every ``torch.empty``/``empty_like`` starts as NaN, so elements a kernel forgot to write show up."""
    monkeypatch.setattr(torch, "empty", _nan_filled(torch.empty))
    monkeypatch.setattr(torch, "empty_like", _nan_filled(torch.empty_like))
    yield


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    yield

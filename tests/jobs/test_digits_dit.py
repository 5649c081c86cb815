"""The digits DiT teacher's training loop: the EMA it saves, determinism and its settings' checks."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from linvision.train.digits_dit import DigitsDiTSettings, train_digits_dit

TINY = dict(vae_channels=[8, 16], vae_steps=2, dit_layers=1, dit_heads=2, dit_head_dim=8, dit_steps=4, dit_warmup=2,
            batch_size=8)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="ema_decay"):
        DigitsDiTSettings(ema_decay=1.0)


def _dit_weights(folder):
    return load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))


def test_teacher_is_deterministic_and_saves_the_ema(tmp_path):
    """Same seed → bit-identical saved DiT; the EMA changes what is saved; another seed changes the weights."""
    runs = {}
    for name, extra in {"a": {}, "b": {}, "no_ema": {"ema_decay": None}, "seed1": {"seed": 1}}.items():
        report = train_digits_dit(str(tmp_path / name), DigitsDiTSettings(**TINY, **extra), threads=1, progress=False)
        assert all(math.isfinite(v) for v in report["dit_loss"])
        runs[name] = _dit_weights(tmp_path / name)
    assert runs["a"].keys() == runs["b"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["no_ema"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["seed1"][k]) for k in runs["a"])

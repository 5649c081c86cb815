"""The digits DiT teacher's training loop: the EMA it saves, determinism, its settings' checks, and the
SANA-style linear teacher (``denoiser="linvision_dit"``, sana + GLUMBConv) through training and sampling."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from linvision.train.digits_dit import DigitsDiTSettings, build_dit, main, train_digits_dit
from tests.helpers import one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)

TINY = dict(vae_channels=[8, 16], vae_steps=2, dit_layers=1, dit_heads=2, dit_head_dim=8, dit_steps=4, dit_warmup=2,
            batch_size=8)


SANA_STYLE = dict(denoiser="linvision_dit", mixer="sana", mlp_layer="glumbconv", dit_pos_embed="none")


@pytest.mark.parametrize("kwargs, match", [
    (dict(ema_decay=1.0), "ema_decay"),
    (dict(denoiser="unet"), "denoiser"),
    (dict(mixer="sana"), "only with denoiser='linvision_dit'"),
    (dict(mlp_layer="glumbconv", dit_mlp_ratio=2.0), "mlp_layer, dit_mlp_ratio: only with"),
    (dict(denoiser="linvision_dit", mixer="nope"), "mixer"),
    (dict(denoiser="linvision_dit", mlp_layer="swiglu"), "mlp_layer"),
    (dict(denoiser="linvision_dit", mixer="sana", mixer_kwargs={"eps": -1.0}), "eps"),  # before any training
    (dict(denoiser="linvision_dit", mixer_kwargs=[1]), "mixer_kwargs"),
    (dict(denoiser="linvision_dit", dit_mlp_ratio=0.0), "dit_mlp_ratio"),
    (dict(denoiser="linvision_dit", dit_pos_embed="rope"), "dit_pos_embed"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDiTSettings(**kwargs)


def test_cli_user_error_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    assert main([str(tmp_path / "out"), "--mixer", "sana"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_default_denoiser_is_diffusers_dit_and_linvision_dit_has_its_sizes():
    from diffusers import DiTTransformer2DModel

    from linvision.models.dit import LinVisionDiT

    assert type(build_dit(DigitsDiTSettings(), 8)) is DiTTransformer2DModel  # the demo's teacher, unchanged
    dit = build_dit(DigitsDiTSettings(**SANA_STYLE), 8)
    assert isinstance(dit, LinVisionDiT) and len(dit.blocks) == 4
    assert dit.config.num_attention_heads * dit.config.attention_head_dim == 64 and dit.config.mlp_ratio == 2.5
    assert type(dit.blocks[0].attn).__name__ == "SanaAttention" and dit.blocks[0].mlp.hidden_features == 160


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


def test_sana_style_teacher_trains_saves_and_samples(tmp_path):
    """A SANA-style linear DiT trained from scratch by the teacher loop, loaded back from its folder, sampled by
    ``sample_dit`` at 1× and 2× the training resolution, and by ``linvision sample``."""
    import json

    import yaml

    from linvision.cli import main as cli
    from linvision.models.dit import LinVisionDiT
    from linvision.sample.dit import sample_dit
    from linvision.sample.pipeline import load_pipeline

    report = train_digits_dit(str(tmp_path / "sana"), DigitsDiTSettings(**TINY, **SANA_STYLE), threads=1,
                              progress=False)
    assert all(math.isfinite(v) for v in report["dit_loss"]) and report["settings"]["mixer"] == "sana"
    pipe = load_pipeline(str(tmp_path / "sana"))
    assert isinstance(pipe.transformer, LinVisionDiT) and pipe.transformer.config.mlp_layer == "glumbconv"
    for size in (16, 32):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        images = sample_dit(pipe, [1, 7], size, size, steps=2, guidance_scale=2.0, generator=gens, output_type="pt")
        assert images.shape == (2, 3, size, size) and torch.isfinite(images).all()
    config = tmp_path / "sample.yaml"
    config.write_text(yaml.safe_dump({
        "pipeline": {"model": str(tmp_path / "sana"), "device": "cpu"},
        "sampling": {"class_labels": [3], "seeds": [0], "height": 32, "width": 32, "steps": 2, "guidance": 2.0},
        "output": {"dir": str(tmp_path / "out")}}))
    assert cli(["sample", "--config", str(config)]) == 0
    assert len(json.loads((tmp_path / "out" / "sample.json").read_text())["images"]) == 1

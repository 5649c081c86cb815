"""``linvision sample`` and ``linvision distill`` on a tiny random ``SanaPipeline`` saved to a folder: its Gemma-2
text encoder (tiny, random, from a config), its 32× DC-AE, its flow-prediction DPM-Solver. Sampling at two
resolutions with a SANA-family adapter; distillation with the flow-matching target, stopped and resumed."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from linvision.cli import main
from linvision.diffusers import DiffusersAdapter
from linvision.distill import Objective, conditioner_for
from linvision.train import distill
from linvision.train.distill_config import build_distill_config
from linvision.train.metrics import MetricsLog
from tests import tiny_diffusers as tiny
from tests.helpers import one_thread  # noqa: F401 - autouse


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny pipeline (with text encoder), a ``sana`` adapter for it, and 4 captioned images."""
    root = tmp_path_factory.mktemp("sana")
    pipe = tiny.build_sana(text_encoder=True)
    pipe.save_pretrained(root / "pipe")
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    adapter.save_pretrained(root / "lit")
    tiny.captioned_images(root / "images", [(70 + i, 64) for i in range(4)])
    return root


def test_sample_at_two_resolutions_with_an_adapter(root, tmp_path):
    for height, width in ((64, 64), (96, 128)):
        out = tmp_path / f"{height}x{width}"
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump({
            "pipeline": {"model": str(root / "pipe"), "adapter": str(root / "lit"), "device": "cpu"},
            "sampling": {"prompts": ["a red fox"], "seeds": [0], "height": height, "width": width, "steps": 2,
                         "guidance": 2.0, "max_sequence_length": 8},
            "output": {"dir": str(out)},
        }))
        assert main(["sample", "--config", str(config)]) == 0
        report = json.loads((out / "sample.json").read_text())
        assert report["resolved"]["family"] == "sana" and report["resolved"]["latent_stride"] == 32
        assert report["resolved"]["adapter"] == {"mechanism": "lit", "layers": 2}
        assert Image.open(out / report["images"][0]["file"]).size == (width, height)


def test_sample_refuses_a_size_off_the_32_pixel_stride(root, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"pipeline": {"model": str(root / "pipe"), "device": "cpu"},
                                      "sampling": {"prompts": ["x"], "height": 48, "width": 64, "steps": 1},
                                      "output": {"dir": str(tmp_path / "out")}}))
    assert main(["sample", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "latent stride 32" in err[-1]
    assert not (tmp_path / "out").exists()


def test_flow_objective_and_conditioner_follow_the_pipeline(root):
    pipe = tiny.load(str(root / "pipe"))
    objective = Objective(pipe.scheduler)  # DPM-Solver with prediction_type=flow_prediction, flow_shift=3
    assert objective.kind == "flow" and objective.num_train_timesteps == 1000
    sigma = objective.sigmas[500]
    t = (1000 - 500) / 1000
    assert torch.isclose(sigma, torch.tensor(3 * t / (1 + 2 * t)), atol=1e-6)  # SANA's shifted flow sigmas
    conditioner = conditioner_for(pipe, max_sequence_length=8)
    cond = conditioner.encode_prompts(["a red fox"])
    assert cond["prompt_embeds"].shape == (1, 8, 8) and cond["prompt_attention_mask"].shape == (1, 8)
    x = torch.randn(1, 4, 2, 3)
    out = conditioner.call(pipe.transformer, x, torch.tensor([700.0]), cond)
    with torch.no_grad():
        ref = pipe.transformer(x, encoder_hidden_states=cond["prompt_embeds"],
                               encoder_attention_mask=cond["prompt_attention_mask"], timestep=torch.tensor([700.0])).sample
    assert torch.equal(out.detach(), ref)


def tiny_run(root, out, **train):
    return {
        "pipeline": {"model": str(root / "pipe")},
        "student": {"mechanism": "sana", "trainable": ["adapter"], "feature_layers": ["all"]},
        "loss": {"task": 1.0, "output": 0.5, "feature": 0.5, "variance": 0.0},
        "data": {"source": "images", "root": str(root / "images"), "captions": str(root / "captions.jsonl"),
                 "resolution": 64, "batch_size": 2, "cond_dropout": 0.5, "max_sequence_length": 8,
                 "center_crop": False},
        "optim": {"lr": 1.0e-3},
        "train": {"output_dir": str(out), "steps": 4, "log_every": 1, "checkpoint_every": None,
                  "mixed_precision": "no", "threads": 1, **train},
        "eval": {"enabled": False},
    }


def test_distill_resumed_run_equals_the_uninterrupted_one(root, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    result = distill.run(build_distill_config(tiny_run(root, full)))
    assert set(result["last"]) == {"loss", "task", "output", "feature"}
    assert distill.run(build_distill_config(tiny_run(root, cut, max_steps=2))) == {}
    distill.run(build_distill_config(tiny_run(root, cut, resume="auto")))
    a, b = (load_file(str(p / "adapter" / "diffusion_pytorch_model.safetensors")) for p in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = MetricsLog(full / "metrics.jsonl").read(), MetricsLog(cut / "metrics.jsonl").read()
    assert [r["step"] for r in rb] == [1, 2, 3, 4] and [r["loss"] for r in rb] == [r["loss"] for r in ra]
    adapter = DiffusersAdapter.from_pretrained(str(full / "adapter"))
    assert adapter.config.family == "sana" and adapter.config.mechanism == "sana"

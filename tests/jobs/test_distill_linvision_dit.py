"""``linvision distill`` and ``linvision sample`` with a ``LinVisionDiT`` teacher (the ``linvision_dit`` family): the
student is a ``LinVisionDiT`` with another mixer that inherits the teacher's weights; it trains, saves, resumes to
the uninterrupted run's weights, and samples at two resolutions. A tiny random teacher; offline, CPU, one thread."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from linvision.cli import main as cli_main
from linvision.diffusers import DiffusersAdapter
from linvision.diffusers.families import LINVISION_DIT, MixerStudent, family_of
from linvision.distill import DistillPair
from linvision.train import distill
from linvision.train.distill_config import build_distill_config, load_distill_config
from tests.helpers import one_thread  # noqa: F401  (autouse)

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random softmax LinVisionDiT in a DiTPipeline (16 px, latent stride 4), saved."""
    folder = tmp_path_factory.mktemp("lvdit") / "pipe"
    LINVISION_DIT.tiny_pipeline().save_pretrained(str(folder))
    return folder


def tiny(out: Path, model: Path, **sections) -> dict:
    tree = {
        "pipeline": {"model": str(model)},
        "student": {"mechanism": "sana", "trainable": ["adapter"], "feature_layers": ["all"]},
        "loss": {"task": 1.0, "output": 0.5, "feature": 0.5, "variance": 0.05},
        "data": {"source": "digits", "resolution": 16, "batch_size": 4, "max_samples": 16, "cond_dropout": 0.3},
        "optim": {"lr": 1.0e-3, "clip_grad": 1.0},
        "train": {"output_dir": str(out), "steps": 4, "log_every": 1, "checkpoint_every": None, "accum_steps": 2,
                  "mixed_precision": "no", "threads": 1},
        "eval": {"enabled": False},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


def test_the_student_is_a_linvision_dit_with_another_mixer_and_the_teachers_weights():
    pipe = LINVISION_DIT.tiny_pipeline()
    original = pipe.transformer
    pair = DistillPair.build(pipe, "sana", trainable=["adapter"], feature_layers="all")
    student, teacher = pair.student, pair.teacher
    assert family_of(pipe) is LINVISION_DIT and pipe.transformer is student and student is not original
    assert student.config.mixer == "sana" and teacher.config.mixer == "softmax"
    assert pair.layers == ["blocks.0.attn", "blocks.1.attn"]
    assert set(pair.trainable) == {n for n, _ in student.named_parameters()}  # the whole student is new
    theirs = teacher.state_dict()
    for name, value in student.state_dict().items():
        if ".attn." not in name:
            assert torch.equal(value, theirs[name]), name
    for mine, their in zip(student.blocks, teacher.blocks):
        q, k, v = their.attn.qkv.weight.chunk(3)
        assert torch.equal(mine.attn.to_q.weight, q) and torch.equal(mine.attn.to_v.weight, v)
        assert torch.equal(mine.attn.to_k.bias, their.attn.qkv.bias.chunk(3)[1])
        assert torch.equal(mine.attn.to_out[0].weight, their.attn.proj.weight)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([3, 1000])
    with torch.no_grad():
        assert not torch.equal(student(x, timestep=t, class_labels=y).sample, teacher(x, timestep=t, class_labels=y).sample)
    assert pair.adapter.uninstall() is original and pipe.transformer is original


def test_a_sana_teacher_gives_a_lit_student_its_projections():
    pipe = LINVISION_DIT.tiny_pipeline(mixer="sana", mlp_layer="glumbconv", pos_embed="none")
    student = MixerStudent.construct_for(pipe, "lit", install=False)
    assert not student.installed and pipe.transformer is not student.model
    attn, src = student.model.blocks[1].attn, pipe.transformer.blocks[1].attn
    assert student.model.config.mixer_kwargs == {"qkv_bias": False, "proj_bias": True}  # the teacher's layout
    assert torch.equal(attn.qkv.weight, torch.cat([src.to_q.weight, src.to_k.weight, src.to_v.weight]))
    assert torch.equal(attn.proj.bias, src.to_out[0].bias)


def test_the_adapters_still_refuse_it_and_a_mismatched_student_is_refused(tmp_path):
    pipe = LINVISION_DIT.tiny_pipeline()
    with pytest.raises(ValueError, match="no attention to replace"):
        DiffusersAdapter.construct_for(pipe, "lit")
    student = MixerStudent.construct_for(pipe, "lit", install=False)
    student.save_pretrained(str(tmp_path / "student"))
    other = LINVISION_DIT.tiny_pipeline(mlp_layer="glumbconv")
    with pytest.raises(ValueError, match="mlp_layer"):
        MixerStudent.from_pretrained(str(tmp_path / "student")).install(other)
    with pytest.raises(ValueError, match="not a LinVisionDiT student|no config.json"):
        MixerStudent.from_pretrained(str(tmp_path))


def test_distill_trains_saves_resumes_exactly_and_samples_at_two_resolutions(teacher, tmp_path, capsys):
    full, cut = tmp_path / "full", tmp_path / "cut"
    result = distill.run(build_distill_config(tiny(full, teacher, eval={"enabled": True, "seeds": [0], "steps": 2,
                                                                          "num_conditions": 1})))
    assert result["steps"] == 4 and result["first"]["feature"] > 0 and result["sample_mse_end"] >= 0
    assert distill.run(build_distill_config(tiny(cut, teacher, train={"max_steps": 2}))) == {}
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["global_step"] == 2
    distill.run(build_distill_config(tiny(cut, teacher, train={"resume": "auto"}, data={"num_workers": 1})))
    a, b = (load_file(str(p / "adapter" / WEIGHTS)) for p in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(teacher / "transformer" / WEIGHTS))
    assert any(not torch.equal(a[k], first[k]) for k in first)  # it trained
    saved = json.loads((full / "adapter" / "config.json").read_text())
    assert saved["_class_name"] == "LinVisionDiT" and saved["mixer"] == "sana" and not (full / "pipeline").exists()
    sample_cfg = yaml.safe_load((full / "sample.yaml").read_text())
    assert sample_cfg["pipeline"]["adapter"] == str(full / "adapter")
    for size in (16, 32):
        out = tmp_path / f"samples{size}"
        assert cli_main(["sample", "--config", str(full / "sample.yaml"), "sampling.seeds=[0]", f"sampling.height={size}",
                         f"sampling.width={size}", f"output.dir={out}"]) == 0
        report = json.loads((out / "sample.json").read_text())
        assert report["resolved"]["family"] == "linvision_dit" and report["resolved"]["latent_stride"] == 4
        assert report["resolved"]["adapter"] == {"mechanism": "sana", "layers": 2}
        assert Image.open(out / report["images"][0]["file"]).size == (size, size)
    plain = tmp_path / "teacher16"
    assert cli_main(["sample", "--config", str(full / "sample.yaml"), "sampling.seeds=[0]", "pipeline.adapter=null",
                     f"output.dir={plain}"]) == 0
    images = [(d / json.loads((d / "sample.json").read_text())["images"][0]["file"]).read_bytes()
              for d in (plain, tmp_path / "samples16")]
    assert images[0] != images[1]  # the student drew the samples, not the teacher


def test_the_shipped_config_fits_a_linvision_dit_teacher():
    cfg = load_distill_config(str(ROOT / "configs" / "distill" / "digits_linvision_dit_sana.yaml"))
    s = cfg.student
    pair = DistillPair.build(LINVISION_DIT.tiny_pipeline(), s.mechanism, s.options, s.inherit, s.trainable,
                             s.feature_layers)
    assert pair.student.config.mixer == "sana" and pair.layers == ["blocks.0.attn", "blocks.1.attn"]

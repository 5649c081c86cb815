"""``linvision linearize``: help, config errors, a tiny two-stage run with a timm-loadable export, exact resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from linvision.cli import main as cli_main
from linvision.linearized import load_pretrained
from linvision.train.classify import run as classify
from linvision.train.config import build_config
from linvision.train.linearize import run
from linvision.train.linearize_config import build_linearize_config, load_linearize_config

from .test_bad_inputs import evil_pickle
from .test_classify import tiny
from .user_errors import user_error

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A one-epoch softmax digits ViT (16 px, 2 blocks, 16 dim), as `linvision classify` writes it."""
    out = tmp_path_factory.mktemp("teacher")
    classify(build_config(tiny(out, model={"mixer": "softmax"}, ema={"enabled": False})))
    return out


def tiny_linearize(out: Path, teacher_dir: Path, **sections) -> dict:
    base = tiny(out)
    tree = {"teacher": {"path": str(teacher_dir)},
            "student": {"mixer": "lolcats", "options": {"lolcats": {"radius": 2}}},
            "transfer": {"epochs": 1, "chunk": 8, "weights": 1.0, "outputs": 100.0},
            "finetune": {"mode": "lora", "lora_rank": 2},
            "data": base["data"], "optim": base["optim"], "train": base["train"]}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


def argv(tree: dict, *extra: str) -> list:
    """``linvision linearize`` with ``tree`` as ``section.key=value`` overrides (JSON values are YAML)."""
    return ["linearize", *(f"{name}.{key}={json.dumps(value)}" for name, section in tree.items()
                           for key, value in section.items()), *extra]


def records(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, teacher):
    """One uninterrupted tiny run: 1 transfer epoch + 1 LoRA epoch of 8 steps each."""
    out = tmp_path_factory.mktemp("full")
    return out, run(build_linearize_config(tiny_linearize(out, teacher)))


def test_two_stage_run_and_timm_loadable_export(full_run, teacher):
    out, result = full_run
    log = records(out)
    assert [(r["epoch"], r["stage"]) for r in log] == [(0, 0), (1, 1), (2, 2)]
    assert len({r["teacher_val_top1"] for r in log}) == 1 and result["epoch"] == 2
    assert (out / "metrics.png").is_file() and (out / "checkpoint.pt").is_file()
    import linvision  # noqa: F401  (registers linvit for timm's local-dir loader)

    plain = timm.create_model(f"local-dir:{out / 'student'}", pretrained=True).eval()
    ours = load_pretrained(out / "student").eval()
    assert type(plain.blocks[0].attn).__name__ == "LolcatsAttention"
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), ours(x), rtol=0, atol=0)
    teacher_w = load_file(str(teacher / "model.safetensors"))
    student_w = load_file(str(out / "student" / "model.safetensors"))
    assert not any("lora" in k for k in student_w)  # merged
    assert not torch.equal(student_w["blocks.0.attn.qkv.weight"], teacher_w["blocks.0.attn.qkv.weight"])
    assert torch.equal(student_w["patch_embed.proj.weight"], teacher_w["patch_embed.proj.weight"])  # not a LoRA target


@pytest.mark.parametrize("cut", [5, 11])  # mid stage 1; mid stage 2 (LoRA injected before loading)
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, teacher, full_run, cut):
    full, part = full_run[0], tmp_path / "part"
    assert run(build_linearize_config(tiny_linearize(part, teacher, train={"max_steps": cut}))) == {}
    assert not (part / "student").exists()
    run(build_linearize_config(tiny_linearize(part, teacher, train={"resume": "auto"})))
    a, b = load_file(str(full / "student" / "model.safetensors")), load_file(str(part / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    for key in ("train_loss", "val_top1", "lr", "step"):
        assert [r[key] for r in records(part)] == pytest.approx([r[key] for r in records(full)], abs=1e-6), key


def test_liger_has_no_stage_one(tmp_path, teacher):
    out = tmp_path / "liger"
    out.mkdir()
    (out / ".checkpoint.pt.deadbeef.tmp").write_bytes(b"from a killed run")
    run(build_linearize_config(tiny_linearize(out, teacher, student={"mixer": "liger", "options": {}},
                                              finetune={"mode": "full"})))
    assert [r["stage"] for r in records(out)] == [0, 2]
    assert not (out / ".checkpoint.pt.deadbeef.tmp").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["linearize", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage: linvision linearize" in text and "transfer.weights" in text and "finetune.mode" in text


def test_config_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    message = user_error(capsys, ["linearize", f"teacher.path={tmp_path / 'missing'}", f"train.output_dir={out}",
                                  "data.source=digits"], out)
    assert message.startswith("teacher.path: ") and not out.exists()
    assert user_error(capsys, ["linearize"]) == "give --config YAML (see configs/linearize/) and/or overrides"
    with pytest.raises(Exception, match="finetune.mode"):
        build_linearize_config(tiny_linearize(out, tmp_path, finetune={"mode": "qlora"}))
    with pytest.raises(Exception, match="exactly one"):
        build_linearize_config(tiny_linearize(out, tmp_path, teacher={"name": "deit_small_patch16_224"}))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "linearize").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    overrides = [] if "digits" in path.stem else ["data.root=/nonexistent"]
    cfg = load_linearize_config(str(path), overrides)
    assert cfg.student.mixer and cfg.train.epochs >= 1


def test_errors_only_the_loaded_files_show_write_nothing(tmp_path, teacher, capsys):
    """Image size, LoRA targets, damaged teacher weights and foreign checkpoints: one line, exit 2, no output."""
    out = tmp_path / "run"

    def says(*extra: str, **sections) -> str:
        return user_error(capsys, argv(tiny_linearize(out, teacher, **sections), *extra), out)

    message = says(data={"img_size": 32})
    assert message.startswith(f"data.img_size=32: the student of teacher {teacher} does not take 32x32 images")
    assert message.endswith("give the size the teacher was built for (16)")
    assert says(finetune={"lora_targets": ["fc9"]}).startswith("finetune.lora_targets: ['fc9'] match no linear")
    evil = evil_pickle(tmp_path / "evil.pt")
    assert says(train={"resume": str(evil)}).endswith("is not a linvision checkpoint (it holds objects other than "
                                                      "tensors and plain data)")
    assert not (tmp_path / "pwned").exists()
    assert says(train={"resume": str(teacher / "checkpoint.pt")}).startswith(
        f"train.resume: {teacher / 'checkpoint.pt'} holds another model")
    cut = tmp_path / "cut_teacher"
    cut.mkdir()
    (cut / "config.yaml").write_bytes((teacher / "config.yaml").read_bytes())
    (cut / "model.safetensors").write_bytes((teacher / "model.safetensors").read_bytes()[:1000])
    assert "is not a readable .safetensors file" in says(teacher={"path": str(cut)})
    assert not out.exists()


def test_rope_vit_teacher_transfer_lora_and_export(tmp_path):
    """A tiny ``vit_*_rope_*`` teacher (a classify run directory) linearized to LoLCATs: RoPE reaches the mixers,
    two transfer and two LoRA steps run, and the export loads with the architecture's sizes."""
    import yaml
    from safetensors.torch import save_file

    teacher_dir, out = tmp_path / "teacher", tmp_path / "out"
    teacher_dir.mkdir()
    model_cfg = {"name": "vit_small_patch16_rope_224", "img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1,
                 "num_heads": 2}
    (teacher_dir / "config.yaml").write_text(yaml.safe_dump({"model": model_cfg}))
    sizes = {k: v for k, v in model_cfg.items() if k != "name"}
    model = timm.create_model(model_cfg["name"], num_classes=10, **sizes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(teacher_dir / "model.safetensors"))
    tree = tiny_linearize(out, teacher_dir, student={"options": {"lolcats": {"radius": 1}}},
                          data={"max_train_samples": 16, "max_val_samples": 8})
    result = run(build_linearize_config(tree))
    assert [(r["epoch"], r["stage"]) for r in records(out)] == [(0, 0), (1, 1), (2, 2)] and result["epoch"] == 2
    student = load_pretrained(out / "student", **sizes).eval()
    assert student.blocks[0].attn.rope_half is False and type(student.blocks[0].attn.mixer).__name__ == "LolcatsAttention"
    assert torch.isfinite(student(torch.randn(2, 3, 16, 16))).all()

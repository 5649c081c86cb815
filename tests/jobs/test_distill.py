"""``linvision distill``: a real tiny run with its files, only the chosen parameters changing, kill-and-resume,
2-process accelerate on CPU, captions + caching on a tiny SD, teacher-generated data, clear config errors.
Tiny random-weight teachers built from configs; offline, CPU, one thread."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from linvision.cli import main as cli_main
from linvision.diffusers import DiffusersAdapter
from linvision.sample.tiny import build_tiny_dit
from linvision.train import distill
from linvision.train.config import ConfigError
from linvision.train.distill_config import build_distill_config, load_distill_config
from linvision.train.distill_data import list_records
from linvision.train.metrics import MetricsLog
from tests import tiny_diffusers
from tests.helpers import one_thread  # noqa: F401  (autouse)
from tests.jobs.user_errors import user_error

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "distill").glob("*.yaml"))
TERMS = {"loss", "task", "output", "feature", "variance"}


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """A tiny random DiT pipeline (32 px, learned sigma, 2x2 tokens)."""
    return build_tiny_dit(str(tmp_path_factory.mktemp("dit") / "pipe"))


def tiny(out: Path, model: str, **sections) -> dict:
    """A seconds-long run: LiT on the tiny DiT, 32 digits at 32 px, every loss term on."""
    tree = {
        "pipeline": {"model": str(model)},
        "student": {"mechanism": "lit", "trainable": ["adapter"], "feature_layers": ["all"]},
        "loss": {"task": 1.0, "output": 0.5, "feature": 0.5, "variance": 0.05},
        "data": {"source": "digits", "resolution": 32, "batch_size": 4, "max_samples": 32},
        "optim": {"lr": 1.0e-3},
        "train": {"output_dir": str(out), "steps": 8, "log_every": 2, "checkpoint_every": 4, "mixed_precision": "no",
                  "threads": 1},
        "eval": {"seeds": [0, 1], "steps": 3, "num_conditions": 1},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return tree


def test_run_writes_adapter_logs_grids_and_a_sample_config(dit, tmp_path, capsys):
    out = tmp_path / "run"
    result = distill.run(build_distill_config(tiny(out, dit)))
    assert result["steps"] == 8 and set(result["first"]) == TERMS
    assert np.isfinite(result["sample_mse_start"]) and np.isfinite(result["sample_mse_end"])
    records = MetricsLog(out / "metrics.jsonl").read()
    assert [r["step"] for r in records] == [2, 4, 6, 8] and all(TERMS <= set(r) for r in records)
    assert [r["step"] for r in MetricsLog(out / "eval.jsonl").read()] == [0, 8]
    grid = Image.open(out / "samples" / "step_000008.png")
    assert grid.size[1] > 2 * 32 and grid.size[0] > 2 * 32  # teacher row over student row, 2 columns
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 8 and len(state["processes"]) == 1
    assert all(".attn1.mixer." in name for name in state["trainable"])
    adapter = DiffusersAdapter.from_pretrained(str(out / "adapter"))
    assert adapter.config.mechanism == "lit" and not (out / "pipeline").exists()
    saved = adapter.state_dict()
    assert torch.equal(saved["0.qkv.weight"], state["trainable"]["transformer_blocks.0.attn1.mixer.qkv.weight"])
    sample_cfg = yaml.safe_load((out / "sample.yaml").read_text())
    assert sample_cfg["pipeline"] == {"model": str(dit), "adapter": str(out / "adapter"), "device": "cpu"}
    assert cli_main(["sample", "--config", str(out / "sample.yaml"), "sampling.seeds=[0]"]) == 0  # linvision sample loads it
    assert "wrote 1 images" in capsys.readouterr().out


def test_only_the_chosen_parameters_change(dit, tmp_path):
    """Trainable = the adapter of block 0 only: it moves; block 1's adapter, every other student weight and the
    whole teacher stay bit-identical."""
    cfg = build_distill_config(tiny(tmp_path, dit, student={"trainable": ["transformer_blocks.0.attn1.*"]},
                                    eval={"enabled": False}))
    job = distill.build(cfg)
    teacher = {k: v.clone() for k, v in job.pair.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in job.pair.student.state_dict().items()}
    assert job.pair.trainable and all(n.startswith("transformer_blocks.0.attn1.") for n in job.pair.trainable)
    assert distill.train_loop(job, MetricsLog(tmp_path / "m.jsonl"), MetricsLog(tmp_path / "e.jsonl")) is False
    assert all(torch.equal(v, teacher[k]) for k, v in job.pair.teacher.state_dict().items())
    changed = {k for k, v in job.pair.student.state_dict().items() if not torch.equal(v, student[k])}
    assert changed == set(job.pair.trainable)


def test_kill_and_resume_reproduces_the_uninterrupted_run(dit, tmp_path):
    """Accumulation, clipping, conditioning dropout, random crops and flips, and LiT's train-everything: stopping
    at step 3 of 8 and resuming (with data-loader workers) gives the uninterrupted run's weights and logs."""
    options = dict(student={"trainable": ["*"]}, optim={"clip_grad": 1.0}, eval={"enabled": False},
                   data={"cond_dropout": 0.3, "center_crop": False, "random_flip": 0.5},
                   train={"accum_steps": 2, "checkpoint_every": None})
    full, cut = tmp_path / "full", tmp_path / "cut"
    distill.run(build_distill_config(tiny(full, dit, **options)))
    assert distill.run(build_distill_config(tiny(cut, dit, **dict(options, train={**options["train"], "max_steps": 3})))) == {}
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["global_step"] == 3 and not (cut / "adapter").exists()
    resumed = dict(options, train={**options["train"], "resume": "auto"}, data={**options["data"], "num_workers": 1})
    distill.run(build_distill_config(tiny(cut, dit, **resumed)))
    a, b = (load_file(str(p / "adapter" / "diffusion_pytorch_model.safetensors")) for p in (full, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # everything trained, so the changed base denoiser is exported too, and sample.yaml points at it
    a, b = (load_file(str(p / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")) for p in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((cut / "sample.yaml").read_text())["pipeline"]["model"] == str(cut / "pipeline")
    ra, rb = MetricsLog(full / "metrics.jsonl").read(), MetricsLog(cut / "metrics.jsonl").read()
    assert [r["step"] for r in rb] == [2, 4, 6, 8]
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_launch_on_cpu(dit, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` with ``train.cpu=true`` (``--cpu`` alone starts one
    process), bf16 autocast: data sharded over both, the log and adapter written once, both RNG states kept."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny(tmp_path / "run", dit, train={"cpu": True, "mixed_precision": "bf16",
                                                                         "steps": 4})))
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = [str(accelerate), "launch"] if accelerate.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    command = launcher + [
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
        "no", "--main_process_port", str(_free_port()), "-m", "linvision.train.distill", "--config", str(config)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout + done.stderr and done.stdout.count('"sample_mse_end"') == 1
    assert [r["step"] for r in MetricsLog(tmp_path / "run" / "metrics.jsonl").read()] == [2, 4]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert len(state["processes"]) == 2 and state["global_step"] == 4
    assert all(v.dtype == torch.float32 for v in state["trainable"].values())  # trainable weights stay fp32
    assert (tmp_path / "run" / "adapter" / "config.json").is_file()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD pipeline with a letter tokenizer and CLIP text encoder, and 4 captioned images."""
    root = tmp_path_factory.mktemp("sd")
    tiny_diffusers.build_sd(tokenizer_folder=str(root / "tok")).save_pretrained(root / "pipe")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, name in enumerate(["a.png", "b.png", "sub/c.png", "sub/d.png"]):
        Image.fromarray(rng.integers(0, 255, (20 + i, 18, 3), dtype=np.uint8)).save(images / name)
        lines.append(json.dumps({"file": name, "text": f"a photo number {'abcd'[i]}"}))
    (root / "captions.jsonl").write_text("\n".join(lines))
    return root


def test_captions_jsonl_with_cached_latents_and_text_on_a_tiny_sd(sd, tmp_path):
    """LinFusion on a v-prediction SD: captions from a JSONL, latents and text embeddings cached once (a second
    run reuses the cache), CFG comparison grids with the cached empty prompt."""
    cache = tmp_path / "cache"
    tree = tiny(tmp_path / "run", sd / "pipe", student={"mechanism": "linfusion"}, loss={"variance": 0.0},
                pipeline={"scheduler_overrides": {"prediction_type": "v_prediction"}},
                data={"source": "images", "root": str(sd / "images"), "captions": str(sd / "captions.jsonl"),
                      "max_samples": None, "resolution": 16, "batch_size": 2, "cache_dir": str(cache),
                      "cond_dropout": 0.5},
                train={"steps": 2}, eval={"guidance": 2.0, "seeds": [0]})
    result = distill.run(build_distill_config(tree))
    assert set(result["last"]) == TERMS - {"variance"}
    latents = load_file(str(cache / "latents.safetensors"))
    text = load_file(str(cache / "text.safetensors"))
    assert latents["mean"].shape == (4, 4, 8, 8) and latents["std"].shape == (4, 4, 8, 8)
    assert text["prompt_embeds"].shape[0] == 4 and text["null.prompt_embeds"].shape[0] == 1
    stamp = (cache / "latents.safetensors").stat().st_mtime_ns
    tree["train"]["output_dir"] = str(tmp_path / "again")
    distill.run(build_distill_config(tree))
    assert (cache / "latents.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="random_flip needs uncached"):
        build_distill_config(dict(tree, data={**tree["data"], "random_flip": 0.5}))


def test_teacher_generated_data_and_folder_sources(dit, tmp_path):
    """CLEAR's self-generated data: the teacher draws each (label, seed) once into the cache; class folders and
    sidecar captions list their examples."""
    out = tmp_path / "run"
    distill.run(build_distill_config(tiny(out, dit, data={"source": "teacher", "class_labels": [3, 5],
                                                          "samples_per_condition": 2, "teacher_steps": 2,
                                                          "max_samples": None},
                                          train={"steps": 2}, eval={"enabled": False})))
    latents = load_file(str(out / "cache" / "latents.safetensors"))
    assert latents["mean"].shape == (4, 4, 4, 4) and "std" not in latents and torch.isfinite(latents["mean"]).all()
    for label in ("cat", "dog"):
        (tmp_path / "cls" / label).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "cls" / label / "0.png")
    (tmp_path / "cap").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cap" / "x.png")
    (tmp_path / "cap" / "x.txt").write_text("a black square\n")
    cfg = build_distill_config(tiny(out, dit, data={"source": "classes", "root": str(tmp_path / "cls"),
                                                    "class_ids": {"cat": 281, "dog": 207}}))
    assert [r.label for r in list_records(cfg.data)] == [281, 207]
    cfg = build_distill_config(tiny(out, dit, data={"source": "images", "root": str(tmp_path / "cap")}))
    assert [r.text for r in list_records(cfg.data)] == ["a black square"]
    (tmp_path / "cap" / "x.txt").unlink()
    with pytest.raises(ConfigError, match="no caption for .*x.png"):
        list_records(cfg.data)


def test_config_errors_are_clear(dit, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    run = tmp_path / "run"
    config.write_text(yaml.safe_dump(tiny(run, dit)))
    message = user_error(capsys, ["distill", "--config", str(config), "student.feature_layers=[blocks.9]"], run)
    assert re.search(r"unknown layer name.*'blocks\.9'.*valid names.*transformer_blocks\.0\.attn1", message)
    assert "unknown key(s) loss.tusk" in user_error(capsys, ["distill", "--config", str(config), "loss.tusk=1"], run)
    message = user_error(capsys, ["distill", "--config", str(config), "data.resolution=20"], run)
    assert message.startswith("data.resolution=20: ") and "multiple of the latent stride 16" in message
    assert "class ids must be in [0, 999]" in user_error(
        capsys, ["distill", "--config", str(config), "eval.class_labels=[5000]"], run)
    try:
        import prodigyopt  # noqa: F401
    except ImportError:
        message = user_error(capsys, ["distill", "--config", str(config), "optim.name=prodigy", "eval.enabled=false"],
                             run)
        assert "prodigyopt" in message


def test_digits_teacher_and_the_distill_benchmark_run_end_to_end(tmp_path):
    """The done-when measurement in miniature: train the digits DiT teacher for a few steps, then
    ``benchmarks/distill_digits.py`` distils it and reports the before/after sample MSE and the loss curves."""
    from linvision.benchmarks.distill_digits import main as bench
    from linvision.train.digits_dit import DigitsDiTSettings, train_digits_dit

    settings = DigitsDiTSettings(vae_channels=[8, 16], vae_steps=3, dit_layers=1, dit_heads=2, dit_head_dim=8,
                                 dit_steps=3, batch_size=8)
    report = train_digits_dit(str(tmp_path / "teacher"), settings, threads=1, progress=False)
    assert report["vae_recon_mse"] > 0 and len(report["dit_loss"]) == 1
    assert bench(["--out", str(tmp_path / "bench"), "--teacher", str(tmp_path / "teacher"), "train.steps=3",
                  "train.log_every=1", "data.max_samples=64", "data.batch_size=8", "eval.class_labels=[0,1]",
                  "eval.seeds=[0]", "eval.steps=2", "eval.every=null"]) == 0
    result = json.loads((tmp_path / "bench" / "report.json").read_text())
    assert np.isfinite(result["sample_mse_before"]) and np.isfinite(result["sample_mse_after"])
    assert result["steps"] == 3 and Path(result["losses_png"]).is_file()


def test_distill_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["distill", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: linvision distill" in out and "student.feature_layers" in out and "loss.variance" in out


FAMILY_OF_MODEL = {"FLUX": "flux", "DiT-": "dit", "PixArt": "pixart", "stable-diffusion": "unet", "digits-dit": "dit",
                   "Sana_": "sana"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_fit_their_family(path):
    """Every shipped config parses, and its student (mechanism, options, init, trainable patterns) builds on a tiny
    teacher of the same family (the feature-layer names are checked against the real models' block counts)."""
    from linvision.distill import DistillPair

    cfg = load_distill_config(str(path), ["data.root=/nonexistent"])
    assert cfg.pipeline.model and cfg.train.steps >= 1
    (family,) = {f for key, f in FAMILY_OF_MODEL.items() if key in cfg.pipeline.model}
    s = cfg.student
    pair = DistillPair.build(tiny_diffusers.BUILDERS[family](), s.mechanism, s.options, s.inherit, s.trainable,
                             feature_layers=[])
    assert pair.trainable
    if family == "flux" and s.feature_layers:  # CLEAR: single blocks 1, 5, ..., 37 of FLUX's 38
        assert [int(n.split(".")[1]) for n in s.feature_layers] == list(range(1, 38, 4))


def test_two_stage_attention_transfer_then_finetune_from_the_adapter(dit, tmp_path):
    """The hedgehog/lolcats recipes' two runs on the tiny DiT: attention transfer (attention-weight term, feature
    maps only), then the whole adapter from stage 1's adapter/ (student.adapter; at a vanishing lr it stays stage 1's)."""
    one, two = tmp_path / "one", tmp_path / "two"
    first = distill.run(build_distill_config(tiny(
        one, dit, student={"mechanism": "hedgehog", "trainable": ["*.feature_map_q.*", "*.feature_map_k.*"]},
        loss={"task": 0.0, "output": 0.0, "feature": 0.0, "variance": 0.0, "attention": 1.0},
        train={"steps": 2, "checkpoint_every": 2, "log_every": 1}, eval={"seeds": [0], "steps": 2})))
    assert first["first"]["attention"] > 0
    weights = "diffusion_pytorch_model.safetensors"
    distill.run(build_distill_config(tiny(
        two, dit, student={"mechanism": "hedgehog", "adapter": str(one / "adapter")}, optim={"lr": 1e-30},
        train={"steps": 1, "checkpoint_every": 1, "log_every": 1}, eval={"seeds": [0], "steps": 2})))
    a, b = load_file(str(one / "adapter" / weights)), load_file(str(two / "adapter" / weights))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-20) for k in a)
    with pytest.raises(ConfigError, match="student.adapter"):
        distill.run(build_distill_config(tiny(tmp_path / "x", dit, student={"mechanism": "lolcats",
                                                                             "adapter": str(one / "adapter")})))

"""Every job's config keys, table-driven: a wrong type, NaN where numeric, out of range, each a one-line error
with exit code 2 and nothing written (the rows fail in the config check, before any model is built: milliseconds
each); then the inputs only the loaded files can judge (image size, pickles, damaged safetensors, stale
temporaries), and the contract through two real subprocesses."""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from linvision.diffusers import DiffusersAdapter
from linvision.errors import one_line
from linvision.sample.config import SECTIONS as SAMPLE_SECTIONS
from linvision.train import checkpoint as ckpt
from linvision.train.config import SECTIONS as CLASSIFY_SECTIONS
from linvision.train.distill_config import SECTIONS as DISTILL_SECTIONS
from linvision.train.linearize_config import SECTIONS as LINEARIZE_SECTIONS
from tests.jobs.user_errors import user_error

ROOT = Path(__file__).resolve().parents[2]
# job -> (its sections, the key of its output folder, overrides that make the rest of the config valid)
JOBS = {
    "classify": (CLASSIFY_SECTIONS, "train.output_dir", ["model.name=linvit_tiny_patch16_224", "data.source=digits"]),
    "distill": (DISTILL_SECTIONS, "train.output_dir", ["pipeline.model=/nonexistent/pipe", "data.source=digits"]),
    "sample": (SAMPLE_SECTIONS, "output.dir", ["pipeline.model=/nonexistent/pipe"]),
    "linearize": (LINEARIZE_SECTIONS, "train.output_dir", ["teacher.path=/nonexistent/teacher", "data.source=digits"]),
}


def _base(tp):
    """``(kind, item type)``: kind is list, dict or scalar; Optional is looked through."""
    if typing.get_origin(tp) is typing.Union:
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    if typing.get_origin(tp) in (list, typing.List):
        return "list", typing.get_args(tp)[0]
    if typing.get_origin(tp) in (dict, typing.Dict):
        return "dict", None
    return "scalar", tp


def _outside(meta, item):
    """A value just outside the field's range, or None when it has none."""
    if "choices" in meta:
        return "not-a-choice"
    if "min" in meta:
        lo = meta["min"]
        return lo if meta.get("min_open") else (lo - 1 if item is int else lo - 0.5)
    if "max" in meta:
        hi = meta["max"]
        return hi if meta.get("max_open") else hi + 1
    return None


def _yaml(value) -> str:
    return {True: "true", False: "false"}.get(value, str(value)) if isinstance(value, bool) else repr(value)


def rows():
    """``(job, key, override value, why)`` for every key of every job (the free-form ``model`` section aside)."""
    for job, (sections, _, _) in JOBS.items():
        for name, cls in sections.items():
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                key, meta = f"{name}.{f.name}", f.metadata
                kind, item = _base(hints[f.name])
                if kind == "dict":
                    yield job, key, "[1, 2]", "wrong type"
                    continue
                if kind == "list":
                    yield job, key, "{a: 1}", "wrong type"
                    if item in (int, float) or "choices" in meta:
                        yield job, key, "[abc]" if item is not str else "[3]", "wrong item type"
                    if item is float:
                        yield job, key, f"[{', '.join(['.nan'] * meta.get('length', 1))}]", "NaN item"
                    if "length" in meta:
                        yield job, key, "[0.5]", "wrong length"
                    bad = _outside(meta, item)
                    if bad is not None and "length" not in meta:
                        yield job, key, f"[{_yaml(bad)}]", "item out of range"
                    continue
                yield job, key, {bool: "maybe", str: "3", int: "abc", float: "abc"}[item], "wrong type"
                if item in (int, float):
                    yield job, key, ".nan", "NaN"
                    yield job, key, "true", "bool as number"
                if item is float:
                    yield job, key, ".inf", "inf"
                bad = _outside(meta, item)
                if bad is not None:
                    yield job, key, _yaml(bad), "out of range"


ROWS = list(rows())


def test_every_numeric_key_of_every_job_has_range_rows():
    scalars = {(job, f"{n}.{f.name}") for job, (sections, _, _) in JOBS.items() for n, cls in sections.items()
               for f in dataclasses.fields(cls) if _base(typing.get_type_hints(cls)[f.name]) in (("scalar", int),
                                                                                               ("scalar", float))}
    assert scalars == {(job, key) for job, key, _, why in ROWS if why == "NaN"}
    assert scalars <= {(job, key) for job, key, _, why in ROWS if why == "out of range"}  # every number has a range
    assert len(ROWS) > 250


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return tmp_path_factory.mktemp("outputs")


@pytest.mark.parametrize("job,key,value,why", ROWS, ids=[f"{j}-{k}-{w}" for j, k, _, w in ROWS])
def test_bad_config_value_is_one_line_exit_2_nothing_written(job, key, value, why, outputs, capsys):
    _, out_key, base = JOBS[job]
    out = outputs / f"{job}-{key}-{why}".replace(" ", "_")
    message = user_error(capsys, [job, *base, f"{out_key}={out}", f"{key}={value}"], out, parse=False)
    assert key.split(".")[0] in message and key.split(".")[1] in message, message
    assert not out.exists()


# --- inputs only the files can judge ---------------------------------------------------------------------------


def classify_argv(out: Path, *extra: str):
    return ["classify", "model.name=linvit_tiny_patch16_224", "model.mixer=linear", "model.img_size=16",
            "model.patch_size=4", "model.embed_dim=16", "model.depth=1", "model.num_heads=2", "data.source=digits",
            "data.img_size=16", "data.batch_size=8", "data.max_train_samples=16", "data.max_val_samples=8",
            "data.num_workers=0", "train.epochs=1", "train.mixed_precision=no", "train.threads=1",
            f"train.output_dir={out}", *extra]


def evil_pickle(path: Path) -> Path:
    """A pickle that would run a command if loaded without weights_only."""

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'pwned'}",))

    path.write_bytes(pickle.dumps({"format": ckpt.FORMAT, "model": Evil()}))
    return path


def test_classify_image_size_and_checkpoint_errors(tmp_path, capsys):
    out = tmp_path / "run"
    message = user_error(capsys, classify_argv(out, "data.img_size=32"), out)
    assert message.startswith("data.img_size=32: linvit_tiny_patch16_224 as configured does not take 32x32 images")
    assert "model.img_size=32" in message
    evil = evil_pickle(tmp_path / "evil.pt")
    message = user_error(capsys, classify_argv(out, f"train.resume={evil}"), out)
    assert message == f"{evil} is not a linvision checkpoint (it holds objects other than tensors and plain data)"
    assert "weights_only" not in message and not (tmp_path / "pwned").exists()
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 half a zip")
    assert "is not a linvision checkpoint (it is truncated" in user_error(
        capsys, classify_argv(out, f"train.resume={tmp_path / 'cut.pt'}"), out)


def test_load_checkpoint_refuses_foreign_files(tmp_path):
    torch.save({"format": 99}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"is not a linvision checkpoint \(format 99, expected 1\)"):
        ckpt.load_checkpoint(tmp_path / "other.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"not a linvision checkpoint \(format 'list'"):
        ckpt.load_checkpoint(tmp_path / "list.pt")


def test_stale_temporaries_are_removed(tmp_path):
    stale = [tmp_path / ".checkpoint.pt.ab12_x9z.tmp", tmp_path / ".config.yaml.0123abcd.tmp",
             tmp_path / ".checkpoint.pt.abc123.tmp"]
    keep = [tmp_path / "checkpoint.pt", tmp_path / ".hidden.tmp", tmp_path / "notes.tmp"]
    for p in stale + keep:
        p.write_bytes(b"x")
    assert sorted(ckpt.remove_stale_temporaries(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert ckpt.remove_stale_temporaries(tmp_path / "absent") == []


def test_classify_run_cleans_stale_temporaries(tmp_path):
    from linvision.train.classify import run
    from linvision.train.config import load_config

    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.deadbeef.tmp").write_bytes(b"from a killed run")
    run(load_config(None, classify_argv(out, "train.max_steps=1")[1:]))
    assert not (out / ".checkpoint.pt.deadbeef.tmp").exists() and (out / "checkpoint.pt").is_file()


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    from linvision.sample.tiny import build_tiny_dit

    root = tmp_path_factory.mktemp("dit")
    folder = build_tiny_dit(str(root / "pipe"))
    from diffusers import DiTPipeline

    DiffusersAdapter.construct_for(DiTPipeline.from_pretrained(folder), "lit").save_pretrained(root / "lit")
    return root


def damaged(root: Path, name: str, damage) -> Path:
    folder = root / name
    if not folder.exists():
        folder.mkdir()
        (folder / "config.json").write_bytes((root / "lit" / "config.json").read_bytes())
        damage(root / "lit" / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.safetensors")
    return folder


def test_adapter_loading_is_strict_and_names_the_file(dit, tmp_path, capsys):
    def truncate(src, dst):
        dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])

    def garbage(src, dst):
        dst.write_bytes(os.urandom(2048))

    def drop_one(src, dst):
        state = load_file(src)
        state.pop("0.proj.weight")
        save_file(state, dst, metadata={"format": "pt"})

    def add_one(src, dst):
        save_file({**load_file(src), "0.extra": torch.zeros(2)}, dst, metadata={"format": "pt"})

    expected = {"truncated": (truncate, "is not a readable .safetensors file"),
                "garbage": (garbage, "is not a readable .safetensors file"),
                "missing": (drop_one, "does not match the adapter: 1 missing: 0.proj.weight"),
                "unexpected": (add_one, "1 unexpected: 0.extra")}
    out = tmp_path / "o"
    for name, (damage, says) in expected.items():
        folder = damaged(dit, name, damage)
        with pytest.raises(ValueError, match="safetensors") as info:
            DiffusersAdapter.from_pretrained(str(folder))
        assert says in one_line(info.value)
        message = user_error(capsys, ["sample", f"pipeline.model={dit / 'pipe'}", f"pipeline.adapter={folder}",
                                      "pipeline.device=cpu", "sampling.height=32", "sampling.width=32",
                                      f"output.dir={out}"], out)
        assert message.startswith("pipeline.adapter: ") and str(folder) in message and says in message


def test_subprocesses_print_one_line_and_exit_2(dit, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = tmp_path / "out"
    runs = [["sample", f"pipeline.model={dit / 'pipe'}", "pipeline.device=cpu", "sampling.guidance=.nan",
             f"output.dir={out}"],
            ["classify", "--config", str(ROOT / "configs" / "classify" / "digits_linear.yaml"),
             "train.checkpoint_every_steps=0", f"train.output_dir={out}"]]
    says = ["sampling.guidance must be finite, got nan",
            "train.checkpoint_every_steps must be an int in [1, inf] or null, got 0"]
    for argv, message in zip(runs, says):
        p = subprocess.run([sys.executable, "-m", "linvision", *argv], capture_output=True, text=True, env=env)
        assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout)
        assert p.stderr.splitlines() == [f"linvision {argv[0]}: error: {message}"], p.stderr
        assert not out.exists()

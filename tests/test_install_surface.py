"""What a plain install promises: ranges rather than pins, Triton on Linux only, extras for the jobs, the
README's two commands naming the extras they need, and the recipes shipped inside the package."""
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

from linvision.configs import ROOT as CONFIGS
from linvision.configs import list_configs, resolve_config

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_dependencies_are_ranges_and_triton_is_linux_only():
    for req in PROJECT["dependencies"]:
        assert "==" not in req.split(";")[0], f"{req}: a library declares ranges, not exact pins"
    assert "torch>=2.5" in PROJECT["dependencies"]
    triton = [r for r in PROJECT["dependencies"] if r.startswith("triton")]
    assert triton == ["triton; platform_system == 'Linux'"]
    core = " ".join(PROJECT["dependencies"])
    for job_only in ("transformers", "scikit-learn", "matplotlib", "accelerate"):
        assert job_only not in core, f"{job_only} serves the jobs only: it belongs to [jobs]"


def test_extras_and_the_readme_commands():
    extras = PROJECT["optional-dependencies"]
    assert {"jobs", "demo", "test"} <= set(extras)
    assert "linvision[jobs]" in extras["demo"] and "linvision[jobs]" in extras["test"]
    readme = (REPO / "README.md").read_text()
    assert '.venv/bin/pip install -e ".[demo]" && .venv/bin/linvision demo' in readme
    test_command = '.venv/bin/pip install -e ".[test]" && .venv/bin/python -m pytest -q -m "not gpu"'
    assert test_command in readme
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_core_imports_without_the_job_packages_or_triton():
    """The library, its models and adapters import and run with every [jobs] package and Triton blocked."""
    blocked = ["transformers", "sklearn", "matplotlib", "accelerate", "triton", "peft"]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import torch, timm, linvision, linvision.timm, linvision.diffusers, linvision.models\n"
        "m = linvision.create_mixer('linear', dim=8, num_heads=2)\n"
        "print(m(torch.randn(1, 7 * 9, 8), hw=(7, 9)).shape)\n"
        "print(timm.create_model('linvit_tiny_patch16_224', img_size=16, patch_size=8, embed_dim=8, depth=1,"
        " num_heads=2, num_classes=2)(torch.randn(1, 3, 16, 16)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_configs_are_package_data():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"]["linvision.configs"] == "configs"
    patterns = tool["package-data"]["linvision.configs"]
    on_disk = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
    assert on_disk == list_configs()
    assert all(any(pathlib.PurePath(name).match(p) for p in patterns) for name in on_disk)


@pytest.mark.parametrize("name", ["configs/classify/digits_linear.yaml", "classify/digits_linear.yaml",
                                  "classify/digits_linear"])
def test_resolve_config_finds_the_shipped_recipe_from_any_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert pathlib.Path(resolve_config(name)) == CONFIGS / "classify" / "digits_linear.yaml"


def test_resolve_config_prefers_an_existing_file_and_passes_unknown_names_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "classify").mkdir()
    (tmp_path / "classify" / "digits_linear.yaml").write_text("model: {name: x}\n")
    assert resolve_config("classify/digits_linear.yaml") == "classify/digits_linear.yaml"
    assert resolve_config("classify/nope.yaml") == "classify/nope.yaml"
    assert resolve_config("../classify/digits_linear.yaml") == "../classify/digits_linear.yaml"


def test_classify_config_loads_by_shipped_name_outside_a_clone(tmp_path, monkeypatch):
    from linvision.train.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config("configs/classify/digits_linear.yaml", ["train.epochs=1"])
    assert cfg.model["name"].startswith("linvit") and cfg.train.epochs == 1
    assert re.search("does not exist", _error(lambda: load_config("configs/classify/none.yaml")))


def _error(fn) -> str:
    try:
        fn()
    except ValueError as err:
        return str(err)
    return ""

"""The diffusers families as objects: one per denoiser kind in one registry, each owning its geometry,
conditioning and tiny builders; and the diffusers package's modules import one another without a circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from linvision.diffusers import FAMILIES, family_named, family_of
from linvision.diffusers.families import vae_scale_factor
from tests import tiny_diffusers as tiny
from tests.helpers import one_thread  # noqa: F401  (autouse)

PACKAGE = Path(__file__).resolve().parents[2] / "linvision" / "diffusers"
# pixels per top-level image token of the tiny pipelines: VAE factor x patch (FLUX: x 2 for its packing)
STRIDES = {"unet": 2, "dit": 16, "pixart": 4, "sd3": 2, "flux": 4, "sana": 32}


def test_names_are_unique_and_found_by_name():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names) and set(tiny.FAMILIES) < set(names)
    assert all(family_named(n) is f and str(f) == n for n, f in zip(names, FAMILIES))
    with pytest.raises(ValueError, match="unknown family 'nope'.*linvision_dit"):
        family_named("nope")
    with pytest.raises(ValueError, match="unsupported denoiser Linear.*LinVisionDiT"):
        family_of(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("name", tiny.FAMILIES)
def test_each_tiny_pipeline_is_its_family_with_its_stride(name):
    family = family_named(name)
    pipe = tiny.BUILDERS[name]()
    denoiser = pipe.unet if name == "unet" else pipe.transformer
    assert family_of(pipe) is family and family_of(denoiser) is family and not denoiser.training
    assert family.latent_stride(vae_scale_factor(pipe), denoiser) == STRIDES[name]
    assert family.conditioner(pipe).family is family
    assert all(family.is_target(n, m) for n, m in family.target_attentions(denoiser))


@pytest.mark.parametrize("family", FAMILIES, ids=str)
def test_the_benchmark_model_runs_on_its_example_inputs(family):
    model = family.random_denoiser(32, 2, 2)
    assert family_of(model) is family
    with torch.no_grad():
        out = model(**family.example_inputs(model, 8, batch=1, text=3)).sample
    assert torch.isfinite(out).all()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules) -> set:
    """The ``linvision.diffusers`` modules ``path`` imports relatively (at module level or inside functions)."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            found.add(".".join(base))
            found.update(".".join(base + [alias.name]) for alias in node.names)
    return {m for m in found if m in modules and m != name}


def test_no_import_circle_inside_the_diffusers_package():
    """No module of ``linvision.diffusers`` reaches itself through the modules it imports (adapter and convert
    were such a pair: each imported the other inside functions)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, files) for m, p in files.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert "linvision.diffusers.adapter" in graph["linvision.diffusers.convert"]
    circles = {m: sorted(graph[m]) for m in graph if m in reach(m)}
    assert not circles, f"modules that import themselves through others: {circles}"

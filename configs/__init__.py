"""The job recipes (``classify/``, ``distill/``, ``sample/`` YAML files), shipped inside the package as
``linvision.configs`` so ``--config`` works from a wheel install as well as from a clone.

>>> resolve_config("configs/classify/digits_linear.yaml")   # a file that exists is used as it is;
>>> resolve_config("classify/digits_linear")                # otherwise the shipped recipe of that name
"""
from __future__ import annotations

from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent


def resolve_config(path: str) -> str:
    """``path`` if it names an existing file, else the shipped recipe it names, else ``path`` unchanged.

    A recipe is named relative to ``configs/`` with or without the ``configs/`` prefix and the ``.yaml``
    suffix: ``configs/sample/tiny_dit.yaml``, ``sample/tiny_dit.yaml`` and ``sample/tiny_dit`` are the same.
    An unknown name comes back unchanged, so the caller's "does not exist" message names what was given.
    """
    if Path(path).is_file():
        return path
    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts:
        return path
    if rel.parts and rel.parts[0] == "configs":
        rel = Path(*rel.parts[1:]) if len(rel.parts) > 1 else Path()
    for candidate in (ROOT / rel, ROOT / rel.with_name(rel.name + ".yaml")):
        if rel.parts and candidate.is_file():
            return str(candidate)
    return path


def list_configs() -> List[str]:
    """Every shipped recipe as ``job/name.yaml``, sorted."""
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("*/*.yaml"))


__all__ = ["ROOT", "list_configs", "resolve_config"]

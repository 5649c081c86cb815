"""The published LinFusion checkpoint format (``Yuanshi/LinFusion-1-5``, ``-2-1``, ``-XL``; spec ``linfusion.md``).

A diffusers ``ModelMixin`` folder: ``config.json`` with ``modules_list`` plus ``diffusion_pytorch_model.safetensors``
(see :mod:`linvision.diffusers.convert` for the layout). Read by ``DiffusersAdapter.from_pretrained`` and by
``convert.load_linfusion``; it imports neither, so the adapter and the converters import without a circle.
"""
from __future__ import annotations

import json
from typing import Dict, List

from .files import check_and_load, fetch_file, read_safetensors

LINFUSION_CLASS_NAMES = ("LinFusion", "StableMamba")
LINFUSION_WEIGHTS = "diffusion_pytorch_model.safetensors"


def linfusion_modules_list(config: Dict) -> List[Dict]:
    """Our ``modules_list`` from a LinFusion ``config.json`` (dict or early list entries)."""
    items = config.get("modules_list")
    if not isinstance(items, list) or not items:
        raise ValueError("a LinFusion config.json needs a non-empty modules_list")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            try:
                name, dim, heads = item["module_name"], item["dim_n"], item["heads"]
            except KeyError as e:
                raise ValueError(f"LinFusion modules_list[{i}] lacks {e}") from None
            mid = item.get("projection_mid_dim")
        elif isinstance(item, (list, tuple)) and len(item) == 3:
            name, dim, heads = item
            mid = None
        else:
            raise ValueError(f"LinFusion modules_list[{i}] is neither a dict nor a [name, dim, heads] list: {item!r}")
        out.append({
            "module_name": str(name),
            "dim": int(dim),
            "heads": int(heads),
            "options": {"projection_mid_dim": mid, "qkv_bias": False, "out_bias": True},
        })
    return out


def read_linfusion(adapter_class, path_or_repo: str, strict: bool = True, **hub_kwargs):
    """A published LinFusion folder or hub repo → an ``adapter_class`` (``DiffusersAdapter``: ``linfusion``, UNet,
    not installed); the class is passed in, so this file needs no import of the adapter."""
    config_path = fetch_file(path_or_repo, "config.json", **hub_kwargs)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path} is not a readable JSON config: {err}") from None
    name = config.get("_class_name")
    if name not in LINFUSION_CLASS_NAMES:
        raise ValueError(f"{path_or_repo}: _class_name {name!r} is not a LinFusion checkpoint ({LINFUSION_CLASS_NAMES})")
    adapter = adapter_class(mechanism="linfusion", modules_list=linfusion_modules_list(config),
                               mixer_options={}, family="unet", kind="self")
    state = read_safetensors(fetch_file(path_or_repo, LINFUSION_WEIGHTS, **hub_kwargs))
    check_and_load(adapter, state, f"{path_or_repo}/{LINFUSION_WEIGHTS}", strict=strict)
    return adapter.eval()


__all__ = ["LINFUSION_CLASS_NAMES", "LINFUSION_WEIGHTS", "linfusion_modules_list", "read_linfusion"]

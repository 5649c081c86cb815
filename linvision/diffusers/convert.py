"""Converters: the published LinFusion and CLEAR checkpoints → :class:`DiffusersAdapter`.

**LinFusion** (``Yuanshi/LinFusion-1-5``, ``-2-1``, ``-XL``; spec ``linfusion.md``): a diffusers
``ModelMixin`` folder, ``config.json`` with ``modules_list`` plus ``diffusion_pytorch_model.safetensors``.

- ``modules_list`` entries are dicts ``{module_name, dim_n, heads, projection_mid_dim}`` (current
  revisions, class ``LinFusion``) or lists ``[module_name, dim_n, heads]`` (early revisions, class
  ``StableMamba``; read as ``projection_mid_dim=None``, i.e. m = C: assumption, the early files were
  not inspected).
- Keys are ``"{i}." +`` the ``GeneralizedLinearAttention`` names (``to_q.weight``, ``to_k.weight``,
  ``to_v.weight``, ``to_out.0.weight/bias``, ``to_q_.{0,1,3}.*``, ``to_k_.…``), ``i`` = position in
  ``modules_list``: our adapter uses the same children, so the file loads as it is (checked key by key).

**CLEAR** (``Huage001/CLEAR``: ``clear_local_{8,16,32}.safetensors``, ``clear_local_{8,16}_down_4…``;
spec ``clear.md``): a plain state dict in ``FluxTransformer2DModel`` names with the trained image-stream
projections ``…attn.to_q/to_k/to_v/to_out.0.*`` of every block and, for ``down_f`` files, the pooling
weights. Assumptions (the files were not inspected; the loader reports any key it cannot place):

- the pooling weight sits at ``…attn.processor.spatial_weight`` (where diffusers puts an ``nn.Module``
  processor's parameters); ``…attn.spatial_weight`` is accepted too;
- a leading ``transformer.`` prefix is stripped;
- the pool factor f is read from the tensors: the ``spatial_weight`` shape ``(1, 1, 1, f, 1, f, 1)``, no
  ``spatial_weight`` = no pooling (f = 1). A given ``pool_factor`` (None or 1 = off) must agree with them;
- the radius r is not in the tensors (the projections are FLUX's shapes for every r): it is ``radius=`` if
  given, else the safetensors metadata ``radius``, else the published file name ``clear_local_{r}[_down_{f}]``
  (whose ``_down_{f}`` must then agree with the tensors), else an error asking for ``radius=``.

Every loader checks keys and shapes and raises ``ValueError`` listing missing, unexpected and
mis-shaped keys (``strict=False`` keeps teacher values for missing keys with a warning instead).
"""
from __future__ import annotations

import json
import logging
import os
import re
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .files import fetch_file, read_safetensors

_logger = logging.getLogger(__name__)

LINFUSION_CLASS_NAMES = ("LinFusion", "StableMamba")
LINFUSION_WEIGHTS = "diffusion_pytorch_model.safetensors"
CLEAR_FILE = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?\.safetensors")


def check_and_load(module: nn.Module, state: Dict[str, Tensor], source: str, strict: bool = True,
                   original_names: Optional[Dict[str, str]] = None) -> None:
    """``module.load_state_dict(state)`` after a full report of missing / unexpected / mis-shaped keys.

    ``original_names``: adapter key → the checkpoint's own key, shown next to unexpected/mis-shaped keys.

    ``ValueError`` if any key is unexpected or mis-shaped, or (``strict``) missing. With ``strict=False``
    missing keys keep their current values and are logged as a warning.
    """
    own = module.state_dict()
    names = original_names or {}

    def label(k: str) -> str:
        return f"{k} ({names[k]})" if k in names and names[k] != k else k

    missing = sorted(set(own) - set(state))
    unexpected = sorted(label(k) for k in set(state) - set(own))
    shapes = sorted(
        f"{label(k)}: checkpoint {tuple(state[k].shape)} vs adapter {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if unexpected or shapes or (strict and missing):
        lines = [f"checkpoint {source} does not match the adapter:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if keys:
                lines.append(f"  {len(keys)} {label}: " + ", ".join(keys[:6]) + (" …" if len(keys) > 6 else ""))
        raise ValueError("\n".join(lines))
    if missing:
        _logger.warning("checkpoint %s lacks %d adapter keys (kept as they are): %s", source, len(missing), missing[:6])
    with torch.no_grad():
        module.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------- LinFusion
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


def load_linfusion(path_or_repo: str, strict: bool = True, **hub_kwargs):
    """A published LinFusion folder or hub repo → a :class:`DiffusersAdapter` (``linfusion``, UNet, not installed)."""
    from .adapter import DiffusersAdapter

    config_path = fetch_file(path_or_repo, "config.json", **hub_kwargs)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_path} is not a readable JSON config: {err}") from None
    name = config.get("_class_name")
    if name not in LINFUSION_CLASS_NAMES:
        raise ValueError(f"{path_or_repo}: _class_name {name!r} is not a LinFusion checkpoint ({LINFUSION_CLASS_NAMES})")
    adapter = DiffusersAdapter(mechanism="linfusion", modules_list=linfusion_modules_list(config),
                               mixer_options={}, family="unet", kind="self")
    state = read_safetensors(fetch_file(path_or_repo, LINFUSION_WEIGHTS, **hub_kwargs))
    check_and_load(adapter, state, f"{path_or_repo}/{LINFUSION_WEIGHTS}", strict=strict)
    return adapter.eval()


# -------------------------------------------------------------------------------------------------- CLEAR
def clear_settings_from_name(path: str) -> Tuple[Optional[int], Optional[int]]:
    """``(radius, pool_factor)`` from a published ``clear_local_{r}[_down_{f}].safetensors`` name; ``(None, None)``
    for any other name."""
    m = CLEAR_FILE.fullmatch(os.path.basename(path))
    if not m:
        return None, None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def clear_pool_factor(state: Dict[str, Tensor], source: str) -> Optional[int]:
    """The pool factor of a CLEAR state dict, from its ``spatial_weight`` tensors (None: no pooling)."""
    shapes = {tuple(t.shape) for k, t in state.items() if k.endswith("spatial_weight")}
    if not shapes:
        return None
    f = next(iter(shapes))
    if len(shapes) > 1 or len(f) != 7 or f[:3] != (1, 1, 1) or f[4] != 1 or f[6] != 1 or f[3] != f[5] or f[3] < 2:
        raise ValueError(f"{source}: spatial_weight tensors must all be (1, 1, 1, f, 1, f, 1) with f >= 2, "
                         f"got {sorted(shapes)}")
    return int(f[3])


def _metadata_radius(path: str) -> Optional[int]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        text = (f.metadata() or {}).get("radius")
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{path}: metadata radius must be a positive int, got {text!r}")
    return int(text)


def clear_settings(path: str, state: Dict[str, Tensor], radius: Optional[int] = None,
                   pool_factor: Optional[int] = None) -> Tuple[int, Optional[int]]:
    """``(radius, pool_factor)`` of a CLEAR checkpoint (see the module docstring): pool factor from the tensors,
    radius as given, from the metadata or from a published file name; ``ValueError`` on any disagreement."""
    name = os.path.basename(path)
    f_state = clear_pool_factor(state, name)
    r_name, f_name = clear_settings_from_name(path)
    given = None if pool_factor in (None, 1) else pool_factor
    if pool_factor is not None and given != f_state:
        raise ValueError(f"{name}: pool_factor {pool_factor} does not match the checkpoint ("
                         + (f"spatial_weight for f={f_state}" if f_state else "no spatial_weight: pool_factor 1 or None")
                         + ")")
    if radius is None:
        radius = _metadata_radius(path)
    if radius is None and r_name is not None:
        if f_name != f_state:
            raise ValueError(f"{name}: the file name says pool factor {f_name or 1}, the tensors say {f_state or 1} "
                             "(a renamed file?); pass radius= and pool_factor=")
        radius = r_name
    if radius is None:
        raise ValueError(f"cannot tell the CLEAR radius of {name!r}: the tensors do not hold it, the file has no "
                         "radius metadata and is not named clear_local_<r>[_down_<f>].safetensors; pass radius=")
    return radius, f_state


def clear_state_to_adapter(
    state: Dict[str, Tensor], module_names: List[str]
) -> Tuple[Dict[str, Tensor], List[str], Dict[str, str]]:
    """Map CLEAR keys to adapter keys: ``(mapped, keys outside every replaced attention, adapter → CLEAR key)``."""
    by_length = sorted(enumerate(module_names), key=lambda t: -len(t[1]))
    mapped, stray, names = {}, [], {}
    for key, tensor in state.items():
        k = key[len("transformer."):] if key.startswith("transformer.") else key
        for i, name in by_length:
            if k.startswith(name + "."):
                rest = k[len(name) + 1:]
                if rest == "spatial_weight":
                    rest = "processor.spatial_weight"
                mapped[f"{i}.{rest}"] = tensor
                names[f"{i}.{rest}"] = key
                break
        else:
            stray.append(key)
    return mapped, stray, names


def load_clear(
    path: str,
    pipe_or_transformer,
    radius: Optional[int] = None,
    pool_factor: Optional[int] = None,
    strict: bool = True,
    install: bool = False,
    **options,
):
    """A CLEAR ``.safetensors`` (local path, or ``"repo_id/filename"`` on the hub) → a ``clear`` adapter.

    The adapter is built for ``pipe_or_transformer`` (a FLUX pipeline or transformer) with the teacher's
    projections, then the checkpoint's tensors replace them. ``options`` go to the CLEAR processor
    (``train_seq_len`` for proportional attention, ``backend``, …).
    """
    from .adapter import DiffusersAdapter

    if not os.path.isfile(path):
        repo, _, filename = path.rpartition("/")
        if not repo:
            raise ValueError(f"{path} is neither a file nor repo_id/filename")
        path = fetch_file(repo, filename)
    state = read_safetensors(path)
    radius, pool_factor = clear_settings(path, state, radius, pool_factor)
    adapter = DiffusersAdapter.construct_for(pipe_or_transformer, "clear", radius=radius, pool_factor=pool_factor,
                                             inherit="qkv+proj", install=False, **options)
    names = [e["module_name"] for e in adapter.config.modules_list]
    mapped, stray, original = clear_state_to_adapter(state, names)
    if stray:
        raise ValueError(
            f"checkpoint {path} has {len(stray)} keys outside the replaced attentions' image-stream weights: "
            + ", ".join(stray[:6])
        )
    check_and_load(adapter, mapped, path, strict=strict, original_names=original)
    if install:
        adapter.install(pipe_or_transformer)
    return adapter


__all__ = ["LINFUSION_CLASS_NAMES", "check_and_load", "clear_pool_factor", "clear_settings", "clear_settings_from_name",
           "clear_state_to_adapter", "linfusion_modules_list", "load_clear", "load_linfusion"]

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

import os
import re
from typing import Dict, List, Optional, Tuple

from torch import Tensor

from .adapter import DiffusersAdapter
from .files import check_and_load, fetch_file, read_safetensors
from .linfusion_file import LINFUSION_CLASS_NAMES, linfusion_modules_list, read_linfusion

CLEAR_FILE = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?\.safetensors")


# ---------------------------------------------------------------------------------------------- LinFusion
def load_linfusion(path_or_repo: str, strict: bool = True, **hub_kwargs) -> DiffusersAdapter:
    """A published LinFusion folder or hub repo → a :class:`DiffusersAdapter` (``linfusion``, UNet, not installed)."""
    return read_linfusion(DiffusersAdapter, path_or_repo, strict=strict, **hub_kwargs)


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

"""Finding and reading the files of a pipeline, adapter or checkpoint: local folders first, the hub only for hub ids.

Every failure is a ``ValueError`` that names the path and what was expected (a missing folder never turns into
huggingface_hub's advice to check the internet connection; a truncated or foreign ``.safetensors`` never into a
bare ``SafetensorError``). The jobs report these as one line naming the config key.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, Optional

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

_logger = logging.getLogger(__name__)

# what loading a pipeline, adapter or checkpoint from a user's path raises for a bad path or a damaged file
LOAD_ERRORS = (ValueError, OSError, SafetensorError)
HUB_KWARGS = ("cache_dir", "local_files_only", "revision", "token", "subfolder", "force_download", "proxies")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set (to anything but 0/false): hub ids are not downloaded."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def looks_like_path(name: str) -> bool:
    """``name`` is meant as a local path, not a hub id (``org/name`` or ``name``)."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith("/") or os.path.exists(name))


def check_source(name: str, what: str, marker: str, subfolder: Optional[str] = None) -> bool:
    """``True`` if ``name`` is a local folder holding ``marker`` (e.g. ``model_index.json``); ``False`` for a
    hub id that may be downloaded. ``ValueError`` for a missing folder, a file, a folder without ``marker``,
    or a hub id while ``HF_HUB_OFFLINE`` is set. ``what`` names the thing in the message ("pipeline", ...)."""
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise ValueError(f"expected a {what} folder or hub id, got {name!r}")
    name = os.fspath(name)
    folder = os.path.join(name, subfolder) if subfolder else name
    if os.path.isdir(folder):
        if not os.path.isfile(os.path.join(folder, marker)):
            raise ValueError(f"{folder} is not a {what} folder: it has no {marker}")
        return True
    if os.path.exists(folder):
        raise ValueError(f"{folder} is a file, not a {what} folder")
    if looks_like_path(name):
        raise ValueError(f"no {what} folder at {folder}")
    if hub_offline():
        raise ValueError(f"no {what} folder at {folder}, and HF_HUB_OFFLINE is set, so it is not fetched from the hub")
    return False


def fetch_file(path_or_repo: str, filename: str, **hub_kwargs) -> str:
    """``filename`` inside the local folder ``path_or_repo`` (its ``subfolder``), else from the hub repo of that id."""
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(path_or_repo):
        path = os.path.join(path_or_repo, subfolder, filename)
        if not os.path.isfile(path):
            raise ValueError(f"{path} does not exist")
        return path
    if looks_like_path(path_or_repo) or hub_offline():
        raise ValueError(f"no folder at {path_or_repo}" + (" (HF_HUB_OFFLINE is set)" if hub_offline() else ""))
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(path_or_repo, filename, **{k: v for k, v in hub_kwargs.items() if k in HUB_KWARGS})
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises many types; keep the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot fetch {filename} from the hub repo {path_or_repo!r}: {first}") from None


def read_safetensors(path: str) -> Dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file on the CPU; ``ValueError`` naming the file if it is not one
    (truncated, garbage, a pickle renamed) or cannot be read."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path} is not a readable .safetensors file (truncated or not safetensors: {reason})") from None


def read_sharded_safetensors(path_or_repo: str, filename: str, **hub_kwargs) -> Dict[str, Tensor]:
    """``filename`` (e.g. ``diffusion_pytorch_model.safetensors``), or every shard its ``.index.json`` lists."""
    try:
        return read_safetensors(fetch_file(path_or_repo, filename, **hub_kwargs))
    except ValueError as missing:
        try:
            index_path = fetch_file(path_or_repo, filename + ".index.json", **hub_kwargs)
        except ValueError:
            raise missing from None
    try:
        with open(index_path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"{index_path} is not a safetensors index (a JSON with a weight_map)") from None
    state: Dict[str, Tensor] = {}
    for shard in shards:
        state.update(read_safetensors(fetch_file(path_or_repo, shard, **hub_kwargs)))
    return state


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


__all__ = ["HUB_KWARGS", "LOAD_ERRORS", "check_and_load", "check_source", "fetch_file", "hub_offline", "looks_like_path", "read_safetensors",
           "read_sharded_safetensors"]

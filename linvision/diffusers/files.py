"""Finding and reading the files of a pipeline, adapter or checkpoint: local folders first, the hub only for hub ids.

Every failure is a ``ValueError`` that names the path and what was expected (a missing folder never turns into
huggingface_hub's advice to check the internet connection; a truncated or foreign ``.safetensors`` never into a
bare ``SafetensorError``). The jobs report these as one line naming the config key.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional

from safetensors import SafetensorError
from torch import Tensor

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


__all__ = ["HUB_KWARGS", "LOAD_ERRORS", "check_source", "fetch_file", "hub_offline", "looks_like_path", "read_safetensors",
           "read_sharded_safetensors"]

"""Memory switches for high-resolution sampling: VAE tiling/slicing, LinFusion's chunked CFG and FFN.

Both chunking tricks are exact (the same numbers up to rounding): CFG chunking splits the denoiser's
batch (cond + uncond) into separate calls; FFN chunking runs every diffusers ``FeedForward`` over token
chunks. They patch ``forward`` of the given instances only, inside a ``with`` block, and restore it after.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

NOT_BATCHED = ("img_ids", "txt_ids")  # FLUX position ids: (N, 3), never split


def vae_switches(height: int, width: int, batch: int, tiling: Optional[bool], slicing: Optional[bool],
                 tiling_pixels: int) -> Dict[str, bool]:
    """``{"tiling": …, "slicing": …}``: the explicit setting, else tiling above ``tiling_pixels`` output
    pixels (the VAE's mid-block attention is quadratic) and slicing when ``batch > 1``."""
    return {
        "tiling": bool(height * width > tiling_pixels) if tiling is None else bool(tiling),
        "slicing": bool(batch > 1) if slicing is None else bool(slicing),
    }


def apply_vae_switches(vae: nn.Module, switches: Dict[str, bool]) -> None:
    """``vae.enable_tiling()`` / ``enable_slicing()`` (diffusers ≥ 0.40: on the VAE, not the pipeline)."""
    (vae.enable_tiling if switches["tiling"] else vae.disable_tiling)()
    (vae.enable_slicing if switches["slicing"] else vae.disable_slicing)()


def _split(value: Any, batch: int, chunks: int, name: str = "") -> List[Any]:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch and name not in NOT_BATCHED:
        return list(value.chunk(chunks))
    if isinstance(value, dict):
        parts = {k: _split(v, batch, chunks, k) for k, v in value.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(chunks)]
    return [value] * chunks


def _join(outputs: List[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)) and not dataclasses.is_dataclass(first):
        return type(first)(_join([o[i] for o in outputs]) for i in range(len(first)))
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: _join([getattr(o, f.name) for o in outputs]) for f in dataclasses.fields(first)})
    return first


@contextlib.contextmanager
def batch_chunked(model: nn.Module, chunks: int, batch_arg: str = "hidden_states") -> Iterator[None]:
    """Within the block, ``model(x, …)`` runs as ``chunks`` calls over batch slices (LinFusion's chunked CFG).

    Tensor arguments whose first dim equals the batch of the first argument are split (nested dicts too,
    FLUX's position ids never); outputs (tensors, tuples, diffusers output dataclasses) are concatenated.
    Forward-pre-hooks still see the whole batch once.
    """
    if chunks <= 1:
        yield
        return
    original = model.forward
    had_own = "forward" in model.__dict__  # e.g. an accelerate offload hook

    def forward(*args, **kwargs):
        x = args[0] if args else kwargs.get("sample", kwargs.get(batch_arg))
        batch = x.shape[0]
        n = min(chunks, batch)
        arg_parts = [_split(a, batch, n) for a in args]
        kw_parts = {k: _split(v, batch, n, k) for k, v in kwargs.items()}
        outs = [original(*[p[i] for p in arg_parts], **{k: p[i] for k, p in kw_parts.items()}) for i in range(n)]
        return _join(outs)

    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            model.__dict__.pop("forward", None)


@contextlib.contextmanager
def ffn_chunked(model: nn.Module, chunks: int) -> Iterator[int]:
    """Within the block, every diffusers ``FeedForward`` in ``model`` runs over ``chunks`` token chunks.

    Yields the number of FeedForward modules patched (FLUX's single blocks use a plain MLP: not chunked).
    """
    from diffusers.models.attention import FeedForward

    targets = [m for m in model.modules() if isinstance(m, FeedForward)] if chunks > 1 else []

    def make(module: nn.Module):
        original = module.forward

        def forward(hidden_states: Tensor, *args, **kwargs):
            if hidden_states.dim() < 3:
                return original(hidden_states, *args, **kwargs)
            return torch.cat([original(part, *args, **kwargs) for part in hidden_states.chunk(chunks, dim=1)], dim=1)

        return forward

    for m in targets:
        m.forward = make(m)
    try:
        yield len(targets)
    finally:
        for m in targets:
            m.__dict__.pop("forward", None)


__all__ = ["apply_vae_switches", "batch_chunked", "ffn_chunked", "vae_switches"]

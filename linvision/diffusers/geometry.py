"""The latent geometry of the current denoiser call, shared by the attention layers of one adapter.

diffusers never passes the token grid to an attention: the UNet flattens inside ``Transformer2DModel``,
DiT/PixArt/SD3 patchify, FLUX packs 2×2 latents and concatenates text. So a forward-pre-hook on the
denoiser (:func:`pre_hook_for`) records the grid of each call on a :class:`LatentGeometry` owned by the
adapter, and every attention layer derives its own level's ``(h, w)`` from its token count ``N``. Nothing
is stored at module level: one installed adapter serves any height and width, call after call.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ..kernels.validation import check_hw, check_int

RULES = ("halving", "patch", "ids")
MAX_LEVELS = 16


class LatentGeometry:
    """Grid of the current call and how each attention level relates to it.

    ``rule``:

    - ``"halving"`` (UNet): ``latent_hw`` is the latent ``(H, W)``; level ``l`` has the grid
      ``(⌈H/2^l⌉, ⌈W/2^l⌉)`` (a stride-2, padding-1, 3×3 downsampler), found from ``N`` by search.
    - ``"patch"`` (DiT, PixArt, SD3): ``latent_hw`` is the latent ``(H, W)``; one level, ``(H//p, W//p)``.
    - ``"ids"`` (FLUX): ``latent_hw`` is the packed image-token grid itself (from ``img_ids``).

    ``latent_hw`` is None until the first denoiser call; using it then raises a clear error.
    """

    def __init__(self, rule: str, patch_size: int = 1):
        if rule not in RULES:
            raise ValueError(f"unknown geometry rule {rule!r}; expected one of {RULES}")
        self.rule = rule
        self.patch_size = check_int("patch_size", patch_size, min=1)
        self.latent_hw: Optional[Tuple[int, int]] = None

    def record(self, hw: Tuple[int, int]) -> None:
        """Store the grid of this call: a pair of positive ints (floats are refused, never rounded)."""
        self.latent_hw = check_hw(hw)

    def _latent(self) -> Tuple[int, int]:
        if self.latent_hw is None:
            raise RuntimeError(
                "the adapter's attention was called before its denoiser: the latent grid is unknown. Call the "
                "denoiser (the installed pre-hook records the grid) or set adapter.geometry.record((H, W))"
            )
        return self.latent_hw

    def token_grid(self) -> Tuple[int, int]:
        """Top-level image-token grid ``(h, w)`` (patch grid; the latent itself for the UNet)."""
        H, W = self._latent()
        if self.rule == "patch":
            return H // self.patch_size, W // self.patch_size
        return H, W

    def grid_for(self, num_tokens: int) -> Tuple[int, int]:
        """The ``(h, w)`` with ``h·w = num_tokens`` at some level of the current call; ``ValueError`` if none."""
        h, w = self.token_grid()
        for _ in range(MAX_LEVELS if self.rule == "halving" else 1):
            if h * w == num_tokens:
                return h, w
            if h == 1 and w == 1:
                break
            h, w = -(-h // 2), -(-w // 2)
        raise ValueError(
            f"an attention got {num_tokens} image tokens, which matches no level of the current latent grid "
            f"{self.latent_hw} (rule {self.rule!r}, patch {self.patch_size})"
        )

    def __repr__(self) -> str:
        return f"LatentGeometry(rule={self.rule!r}, patch_size={self.patch_size}, latent_hw={self.latent_hw})"


def _argument(args: Tuple[Any, ...], kwargs: Dict[str, Any], name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def grid_from_ids(img_ids: Tensor) -> Tuple[int, int]:
    """FLUX ``img_ids (N, 3)`` (or ``(B, N, 3)``) of ``(0, row, col)`` → the token grid ``(rows, cols)``."""
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[-1] < 3:
        raise ValueError(f"expected img_ids of shape (N, 3), got {tuple(img_ids.shape)}")
    rows = int(ids[:, 1].max().item()) + 1
    cols = int(ids[:, 2].max().item()) + 1
    if rows * cols != ids.shape[0]:
        raise ValueError(
            f"img_ids describe a {rows}x{cols} grid but hold {ids.shape[0]} tokens: only a single image grid "
            "(FLUX text-to-image / img2img) is supported"
        )
    return rows, cols


def pre_hook_for(geometry: LatentGeometry, check_call: Optional[Callable[[Dict[str, Any]], None]] = None) -> Callable:
    """A ``register_forward_pre_hook(..., with_kwargs=True)`` hook that records each call's grid.

    Reads ``sample`` (UNet) / ``hidden_states`` (transformers) ``(B, C, H, W)``, or FLUX's ``img_ids``.
    ``check_call(kwargs)``, if given, first vets the call's keyword arguments (e.g. ``joint_attention_kwargs``).
    FLUX's grid comes from the values of ``img_ids`` (a device read, hence a graph break under
    ``torch.compile``) unless the call gives it: ``joint_attention_kwargs={"linvision_grid": (h, w)}``
    (packed tokens: latent size // 2), which compiles without a break.
    """

    def hook(module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if check_call is not None:
            check_call(kwargs)
        if geometry.rule == "ids":
            grid = (kwargs.get("joint_attention_kwargs") or {}).get("linvision_grid")
            if grid is not None:  # the caller's grid: no read of img_ids, so no graph break under torch.compile
                geometry.record(grid)
                return
            ids = _argument(args, kwargs, "img_ids", 4)
            if ids is None:
                raise ValueError("the FLUX transformer was called without img_ids: the image grid is unknown")
            geometry.record(grid_from_ids(ids))
            return
        x = _argument(args, kwargs, "sample" if geometry.rule == "halving" else "hidden_states", 0)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"expected a latent of shape (B, C, H, W), got {tuple(getattr(x, 'shape', ()))}")
        geometry.record(tuple(x.shape[-2:]))

    return hook


__all__ = ["LatentGeometry", "grid_from_ids", "pre_hook_for"]

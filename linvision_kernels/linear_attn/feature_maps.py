"""Elementwise feature maps that the linear-attention kernels apply as they load q and k.

Applying φ inside the kernel saves a full pass (and a full copy) over Q and K. Names:
``"relu"`` (LiT, LINA, with ``feature_offset=1e-6``), ``"elu+1"`` (LinFusion, Katharopoulos et al.).
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

FEATURE_MAPS = ("relu", "elu+1")


def apply_feature_map(t: Tensor, feature_map: Optional[str], offset: float) -> Tensor:
    """φ(t) + offset, computed in ``t``'s dtype; ``feature_map=None`` is the identity."""
    if feature_map == "relu":
        t = F.relu(t)
    elif feature_map == "elu+1":
        t = F.elu(t) + 1.0
    elif feature_map is not None:
        raise ValueError(f"unknown feature_map {feature_map!r}; expected one of {FEATURE_MAPS} or None")
    return t + offset if offset else t

"""Input checks shared by the ops' public functions; each raises ``ValueError`` naming the argument at fault.

Layout everywhere is ``[B, N, H, D]``. The kernels take fp16, bf16 and fp32; the PyTorch references also fp64.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backend import KERNEL_DTYPES

INPUT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_4d(**tensors) -> None:
    """Every keyword argument is a 4-D tensor ``[B, N, H, D]``."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, N, H, D], got shape {tuple(getattr(t, 'shape', ()))}")


def check_qkv(q, k, v, *, cross: bool = False, dk: str = "Dk") -> None:
    """4-D ``q, k, v`` of one supported dtype, ``v [B, ·, H, Dv]`` beside its keys.

    ``cross=False``: ``k`` has the shape of ``q`` (one token set). ``cross=True``: ``k [B, M, H, Dk]`` with
    its own token count ``M`` (``dk`` names the head dim in the message).
    """
    check_4d(q=q, k=k, v=v)
    if q.dtype not in INPUT_DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; expected fp16, bf16, fp32 or fp64")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, N, H, D = q.shape
    if cross:
        M = k.shape[1]
        if k.shape != (B, M, H, D):
            raise ValueError(f"k must be [B, M, H, {dk}] = [{B}, M, {H}, {D}], got {tuple(k.shape)}")
        if v.shape[:3] != (B, M, H):
            raise ValueError(f"v must be [B, M, H, Dv] = [{B}, {M}, {H}, Dv], got {tuple(v.shape)}")
        return
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, N, H):
        raise ValueError(f"v must be [B, N, H, Dv] = [{B}, {N}, {H}, Dv], got {tuple(v.shape)}")


def check_triton_dtype(q: Tensor, *, interpreter_fp64: bool = False) -> None:
    """The Triton kernels take fp16, bf16 and fp32; fp64 belongs to ``backend='torch'``.

    ``interpreter_fp64``: the op's kernels also run fp64 under the CPU interpreter (for ``gradcheck``), so
    only fp64 CUDA tensors are refused.
    """
    if q.dtype != torch.float64 or (interpreter_fp64 and not q.is_cuda):
        return
    where = " CUDA tensors" if interpreter_fp64 else ""
    raise ValueError(f"the Triton backend takes fp16, bf16 or fp32{where}; use backend='torch' for fp64")


def check_bool(name: str, value) -> bool:
    """``value`` is a real ``bool`` (not a string, not an int); returned as is."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def _is_int(value) -> bool:
    if isinstance(value, Tensor):
        return value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(name: str, value, *, min: Optional[int] = None, max: Optional[int] = None) -> int:
    """``value`` is an int (or a one-element integer tensor) within ``[min, max]``; returned as a Python int.

    A bool, a float (even ``8.0``) or a string is refused.
    """
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if (min is not None and value < min) or (max is not None and value > max):
        lo = "-inf" if min is None else min
        hi = "inf" if max is None else max
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value}")
    return value


def check_odd_int(name: str, value) -> int:
    """A positive odd int (a convolution kernel size whose ``padding = k // 2`` keeps the grid)."""
    value = check_int(name, value, min=1)
    if value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int, got {value}")
    return value


def check_float(
    name: str,
    value,
    *,
    min: Optional[float] = None,
    max: Optional[float] = None,
    min_open: bool = False,
    max_open: bool = False,
    allow_neg_inf: bool = False,
) -> float:
    """``value`` is a finite real number (int or float, not a bool or a string) within the given bounds.

    ``min_open`` / ``max_open`` exclude the bound itself (e.g. ``min=0, min_open=True`` for an eps > 0).
    ``allow_neg_inf``: ``-inf`` is accepted too (e.g. an initial log-sum-exp; NaN and ``+inf`` never are).
    Returned as a Python float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if allow_neg_inf and value == -math.inf:
        return value
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    below = min is not None and (value <= min if min_open else value < min)
    above = max is not None and (value >= max if max_open else value > max)
    if below or above:
        lo = "-inf" if min is None else min
        hi = "inf" if max is None else max
        interval = f"{'(' if min_open or min is None else '['}{lo}, {hi}{')' if max_open or max is None else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence) -> object:
    """``value`` is one of ``choices`` (compared with ``==`` after a type check, so ``True`` is not ``1``)."""
    for c in choices:
        if type(value) is type(c) and value == c:
            return value
    raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")


def check_floating_dtype(name: str, value) -> torch.dtype:
    """``value`` is a floating ``torch.dtype`` (fp16, bf16, fp32 or fp64); returned as is."""
    if not isinstance(value, torch.dtype) or value not in INPUT_DTYPES:
        raise ValueError(f"{name} must be torch.float16, bfloat16, float32 or float64, got {value!r}")
    return value


def check_optional(check: Callable, name: str, value, *args, **kwargs):
    """``None``, or ``check(name, value, *args, **kwargs)``: an option whose ``None`` means "off" or "default"."""
    return None if value is None else check(name, value, *args, **kwargs)


def check_hw(hw, name: str = "hw") -> Tuple[int, int]:
    """``hw`` is a pair ``(h, w)`` of positive ints (Python ints or one-element integer tensors).

    Floats (even ``8.0``), bools, strings and other shapes are refused: coercing them would run a silently
    different grid. ``name`` names the argument in the message (e.g. ``"gate_grid"``).
    """
    if isinstance(hw, (str, bytes)):
        raise ValueError(f"{name} must be a pair (h, w) of ints, got {hw!r}")
    try:
        h, w = hw
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (h, w) of ints, got {hw!r}") from None
    if not (_is_int(h) and _is_int(w)):
        raise ValueError(f"{name} must be a pair (h, w) of ints, got {hw!r}")
    h, w = int(h), int(w)
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def expand_floating(name: str, t, shape: Sequence[int], target: str) -> Tensor:
    """``t`` (a floating tensor of at most ``len(shape)`` dims) expanded to ``shape``; ``target`` names that
    shape in the messages."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() > len(shape):
        raise ValueError(f"{name} must be a floating tensor that broadcasts to {target}")
    try:
        return t.expand(*shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {target}") from None


__all__ = [
    "INPUT_DTYPES",
    "check_4d",
    "check_bool",
    "check_choice",
    "check_float",
    "check_floating_dtype",
    "check_hw",
    "check_int",
    "check_odd_int",
    "check_optional",
    "check_qkv",
    "check_triton_dtype",
    "expand_floating",
]

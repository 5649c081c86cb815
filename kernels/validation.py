"""Input checks shared by the ops' public functions; each raises ``ValueError`` naming the argument at fault.

Layout everywhere is ``[B, N, H, D]``. The kernels take fp16, bf16 and fp32; the PyTorch references also fp64.
"""
from __future__ import annotations

from typing import Sequence

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


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def expand_floating(name: str, t, shape: Sequence[int], target: str) -> Tensor:
    """``t`` (a floating tensor of at most ``len(shape)`` dims) expanded to ``shape``; ``target`` names that
    shape in the messages."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() > len(shape):
        raise ValueError(f"{name} must be a floating tensor that broadcasts to {target}")
    try:
        return t.expand(*shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {target}") from None


__all__ = ["INPUT_DTYPES", "check_4d", "check_bool", "check_qkv", "check_triton_dtype", "expand_floating"]

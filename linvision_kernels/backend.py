"""Choosing between a kernel's PyTorch reference and its Triton implementation."""
from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

BACKENDS = ("auto", "torch", "triton")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of states, normalisers and sums for inputs of ``dtype``: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_importable() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: str, choices: Sequence[str] = BACKENDS) -> str:
    """``backend`` is one of ``choices`` (default :data:`BACKENDS`; an op without a Triton kernel passes its
    own); returned as is, else ``ValueError`` naming the choices. The one backend check of every op and mixer."""
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"unknown backend {backend!r}; expected one of {tuple(choices)}")
    return backend


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for ``backend`` in :data:`BACKENDS`.

    ``auto`` picks Triton for CUDA tensors when Triton is importable, else the reference.
    ``triton`` on CPU tensors needs the interpreter; asking for it otherwise is an error.
    """
    check_backend(backend)
    on_cuda = bool(tensors) and all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_importable() else "torch"
    if backend == "triton":
        if not triton_importable():
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        if not on_cuda and not triton_interpreting():
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    return backend

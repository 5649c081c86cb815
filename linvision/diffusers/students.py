"""The student part of a distillation for any family: what ``linvision distill`` trains and saves, and what
``linvision sample`` loads and installs.

For the diffusers families it is a :class:`~linvision.diffusers.adapter.DiffusersAdapter`; a family may name
another class with the same surface (``construct_for``, ``from_pretrained``, ``install``, ``uninstall``,
``save_pretrained``, ``parameters``, ``config.mechanism`` / ``config.modules_list``): the ``linvision_dit``
family's :class:`~linvision.diffusers.families.linvision_dit.MixerStudent`, a whole ``LinVisionDiT`` with
another mixer. This module sits above the adapter and the families, so neither imports the other's way back.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from .adapter import DiffusersAdapter
from .families import family_of


def student_class(pipe_or_denoiser) -> type:
    """The class of the student part for ``pipe_or_denoiser``'s family."""
    return family_of(pipe_or_denoiser).student_class or DiffusersAdapter


def build_student(pipe, mechanism: str, inherit: Optional[str] = None, options: Optional[Dict[str, Any]] = None):
    """A new student part for ``pipe`` (``construct_for``: initialised from the teacher), installed."""
    return student_class(pipe).construct_for(pipe, mechanism, inherit=inherit, **dict(options or {}))


def load_student(pipe, path: str):
    """The student part saved at ``path`` (``from_pretrained``) for ``pipe``'s family, not installed."""
    return student_class(pipe).from_pretrained(path)


__all__ = ["build_student", "load_student", "student_class"]

"""Forward hooks that capture per-layer attention outputs, by module name, in teacher and student.

The layers are named as in the denoiser (``transformer_blocks.0.attn1``, ``single_transformer_blocks.5.attn``):
the same names address the teacher's softmax attention and, once an adapter is installed, the student's
replacement (a :class:`~linvision.diffusers.self_attention.SelfAttentionShell`, or the teacher-shaped joint
attention running the adapter's processor). A captured output is what the module returns: ``(B, N, C)``
after ``to_out`` for self-attention (LinFusion's feature), a tensor or an ``(image, text)`` tuple for joint
attention (CLEAR's feature in single blocks is the raw ``[B, T+N, C]`` joint output).
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, List, Sequence, Union

from torch import nn

ALL = "all"


def resolve_layers(valid: Sequence[str], requested: Union[str, Sequence[str], None]) -> List[str]:
    """The layers to match, in ``valid``'s order.

    ``requested``: ``"all"`` (or ``["all"]``), ``None``/``[]`` (none), or names and glob patterns
    (``transformer_blocks.*``). An exact name not in ``valid``, or a pattern matching nothing, raises
    ``ValueError`` listing the valid names.
    """
    if requested is None:
        return []
    if isinstance(requested, str):
        requested = [requested]
    if list(requested) == [ALL]:
        return list(valid)
    chosen, unknown = set(), []
    for item in requested:
        if item == ALL:
            raise ValueError("'all' cannot be combined with layer names in the feature-matching list")
        matches = [n for n in valid if fnmatch.fnmatchcase(n, item)] if any(c in item for c in "*?[") else \
            [n for n in valid if n == item]
        if not matches:
            unknown.append(item)
        chosen.update(matches)
    if unknown:
        raise ValueError(f"unknown layer name(s) in the feature-matching list: {unknown}; valid names "
                         f"({len(valid)}): {list(valid)} (glob patterns and 'all' are accepted too)")
    return [n for n in valid if n in chosen]


class FeatureHooks:
    """Forward hooks on ``model``'s modules ``names`` that keep each module's last output.

    ``outputs[name]`` is overwritten on every call (a gradient-checkpointing recompute rewrites the same
    value); :meth:`clear` drops them (once per step), ``enabled = False`` pauses capturing (sampling),
    :meth:`remove` detaches the hooks.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.names = list(names)
        self.outputs: Dict[str, Any] = {}
        self.enabled = True
        self._handles = []
        for name in self.names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{type(model).__name__} has no module {name!r}") from None
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(module: nn.Module, args, output) -> None:
            if self.enabled:
                self.outputs[name] = output

        return hook

    def features(self) -> List[Any]:
        """The captured outputs in ``names`` order; ``RuntimeError`` if a layer did not run."""
        missing = [n for n in self.names if n not in self.outputs]
        if missing:
            raise RuntimeError(f"no output captured for layer(s) {missing}: did the forward pass run them?")
        return [self.outputs[n] for n in self.names]

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.outputs.clear()


__all__ = ["ALL", "FeatureHooks", "resolve_layers"]

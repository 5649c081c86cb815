"""Which mixer each layer of a model gets, and with which options.

Shared by the linvision ViT (``mixer=``, ``mixer_kwargs=``) and :func:`linvision.timm.linearize`, so a
hybrid is spelled the same way in both.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..mixers import list_mixers, mixer_class, mixer_options

MixerSpec = Union[str, Sequence[str]]


def resolve_mixers(mixer: MixerSpec, depth: int) -> List[str]:
    """The mixer name of each of ``depth`` layers.

    ``mixer`` is one name (every layer), a list of ``depth`` names (one per layer), or a shorter list whose
    length divides ``depth``: a pattern repeated from the first layer, e.g. ``['linear'] * 3 + ['softmax']``
    at depth 12 gives three ``linear, linear, linear, softmax`` groups. A string with commas
    (``"linear,linear,linear,softmax"``) is read as such a list, for command lines.

    Raises ``ValueError`` for an unknown name, an empty list, or a length that neither equals nor divides
    ``depth``.
    """
    if isinstance(mixer, str):
        names = [s.strip() for s in mixer.split(",")]
    elif isinstance(mixer, Sequence):
        names = list(mixer)
    else:
        raise ValueError(f"mixer must be a name or a list of names, got {mixer!r}")
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"mixer must be a non-empty name or list of names, got {mixer!r}")
    if depth % len(names):
        raise ValueError(
            f"a per-layer mixer list of length {len(names)} must equal depth={depth} or divide it (a repeated pattern)"
        )
    for name in dict.fromkeys(names):
        mixer_class(name)  # ValueError for unknown names
    return names * (depth // len(names))


def layer_options(
    name: str, mixer_kwargs: Optional[Mapping[str, Any]] = None, defaults: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """Constructor options for one layer whose mixer is ``name``.

    ``mixer_kwargs`` keys that are registered mixer names hold that mechanism's own options (a dict); all
    other keys apply to every layer. So ``{'eps': 1e-5, 'linear': {'feature_map': 'relu'}}`` gives ``eps`` to
    every layer and ``feature_map`` to the ``linear`` layers only. The mechanism's own dict wins over the
    shared keys, which win over ``defaults``; a default is kept only where mixer ``name`` accepts it
    (e.g. the model's ``qkv_bias``). Unknown options are left for ``create_mixer`` to reject.
    """
    mixer_kwargs = dict(mixer_kwargs or {})
    registered = set(list_mixers())
    own = mixer_kwargs.get(name) or {}
    if not isinstance(own, Mapping):
        raise ValueError(f"mixer_kwargs[{name!r}] must be a dict of {name} options, got {own!r}")
    for key, value in mixer_kwargs.items():
        if key in registered and not isinstance(value, Mapping):
            raise ValueError(f"mixer_kwargs[{key!r}] must be a dict of {key} options, got {value!r}")
    accepted = set(mixer_options(name))
    options = {k: v for k, v in (defaults or {}).items() if k in accepted}
    options.update({k: v for k, v in mixer_kwargs.items() if k not in registered})
    options.update(own)
    return options


__all__ = ["MixerSpec", "layer_options", "resolve_mixers"]

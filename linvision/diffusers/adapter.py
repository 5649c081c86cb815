"""The adapter object: only the new and changed attention weights of one denoiser, LinFusion style.

>>> from linvision.diffusers import DiffusersAdapter
>>> adapter = DiffusersAdapter.construct_for(pipe, mechanism="linfusion")   # built, teacher-shaped, installed
>>> image = pipe(prompt, height=1024, width=2048).images[0]                  # any multiple of the latent stride
>>> adapter.save_pretrained("my-adapter")                                      # config.json + safetensors
>>> adapter.uninstall()                                                        # the teacher again, bit for bit
>>> DiffusersAdapter.from_pretrained("my-adapter").install(pipe)

Layout (a diffusers ``ModelMixin`` + ``ConfigMixin``):

- ``config.json``: ``mechanism``, ``family`` (``unet``/``dit``/``pixart``/``sana``/``sd3``/``flux``), ``kind``
  (``self``/``joint``), ``mixer_options`` (shared by all layers) and ``modules_list``: one entry
  ``{module_name, dim, heads, options}`` per replaced attention, in the denoiser's module order
  (``options``: the per-layer layout, e.g. bias flags, LinFusion's ``projection_mid_dim``).
- ``diffusion_pytorch_model.safetensors``: child ``"{i}"`` holds the layer for ``modules_list[i]``, the
  key layout of the published LinFusion checkpoints (``0.to_q.weight``, ``0.to_q_.0.weight``, …).

Self-attention families get a linvision mixer per ``attn1`` (any registered mixer); joint families
(SD3, FLUX) get a :class:`~linvision.diffusers.joint.JointLayer` (``clear``, ``lit``, ``linfusion``).
Resolution comes from each call: :meth:`install` registers a forward-pre-hook on the denoiser that
records the latent grid on ``adapter.geometry``; nothing is stored at module level.

While installed, the adapter's layers are also submodules of the denoiser (so ``pipe.to(...)``, CPU
offload and dtype casts move them) and the replaced originals are kept by the adapter for
:meth:`uninstall`, which restores them exactly. Replaced self-attentions are no longer diffusers
``Attention`` modules, so ``set_attn_processor`` / xFormers toggles do not reach them (LinFusion's
behaviour).

Beside diffusers' own features:

- ``pipe.save_pretrained(folder)`` while installed writes the teacher (loadable by diffusers as it is) and
  the adapter in ``<denoiser folder>/linvision_adapter/``; reinstall it with :meth:`from_pretrained`.
- LoRA (``pipe.load_lora_weights``, peft): loaded before :meth:`construct_for`, the replaced attentions'
  LoRA is inherited with the weights (base plus active deltas) and the rest keeps running; loaded while
  installed, LoRA reaches every layer but the replaced attentions (diffusers reports their keys as
  unexpected: those modules are gone). The mixers' own linears take peft LoRA like any other
  (``target_modules=["attn1.mixer.qkv", "attn1.mixer.proj"]``).
- ``fuse_qkv_projections`` / ``unfuse_qkv_projections`` work around install and uninstall, which restores
  the original modules and processors.
- ``torch.compile`` of FLUX: the grid is read from the values of ``img_ids`` (a graph break) unless the call
  gives it, ``pipe(..., joint_attention_kwargs={"linvision_grid": (H // 16, W // 16)})``: no break then.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .families import denoiser_of, family_of
from .files import HUB_KWARGS, check_and_load, check_source, read_sharded_safetensors
from .geometry import LatentGeometry, pre_hook_for
from .joint import JointLayer, check_joint_attention_kwargs, inherit_joint, joint_layout
from .linfusion_file import LINFUSION_CLASS_NAMES, read_linfusion
from .self_attention import (
    INHERIT_MODES,
    SelfAttentionShell,
    build_mixer,
    default_inherit,
    inherit_weights,
    layout_options,
)

_logger = logging.getLogger(__name__)
KINDS = ("self", "joint")


ADAPTER_FOLDER = "linvision_adapter"


def _save_teacher_and_adapter(adapter: "DiffusersAdapter", denoiser: nn.Module, save_directory, *args, **kwargs):
    """The denoiser's ``save_pretrained`` while an adapter is installed (``pipe.save_pretrained`` calls it).

    Writes the teacher, which diffusers' ``from_pretrained`` loads as it is (the adapter is uninstalled for the
    write and installed again after), and the adapter beside it in ``save_directory/linvision_adapter/``.
    """
    adapter.uninstall()
    try:
        type(denoiser).save_pretrained(denoiser, save_directory, *args, **kwargs)
    finally:
        adapter.install(denoiser)
    folder = os.path.join(save_directory, ADAPTER_FOLDER)
    adapter.save_pretrained(folder, safe_serialization=kwargs.get("safe_serialization", True))
    _logger.warning("saved the teacher %s with its linvision adapter in %s; load the pipeline, then "
                    "DiffusersAdapter.from_pretrained(%r).install(pipe)", type(denoiser).__name__, folder, folder)


@dataclass
class _Installation:
    """What :meth:`DiffusersAdapter.uninstall` needs; plain Python, never a registered submodule."""

    denoiser: nn.Module
    hook: Any
    restore: List[tuple] = field(default_factory=list)  # (kind, parent/attn, name/originals, original)


def _check_joint_call(kwargs: Dict[str, Any]) -> None:
    """The denoiser call's ``joint_attention_kwargs`` hold only keys the joint processors take."""
    check_joint_attention_kwargs(kwargs.get("joint_attention_kwargs"))


def _resolve(root: nn.Module, name: str):
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    return parent, leaf


class DiffusersAdapter(ModelMixin, ConfigMixin):
    """New/changed attention weights for one diffusers denoiser (see the module docstring).

    Constructor arguments are the saved config; use :meth:`construct_for` to build one for a model.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        mechanism: str = "linfusion",
        modules_list: Optional[List[Dict[str, Any]]] = None,
        mixer_options: Optional[Dict[str, Any]] = None,
        family: Optional[str] = None,
        kind: str = "self",
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
        options = dict(mixer_options or {})
        for i, entry in enumerate(modules_list or []):
            try:
                if not isinstance(entry["module_name"], str):
                    raise TypeError
                dim, heads = int(entry["dim"]), int(entry["heads"])
                extra = dict(entry.get("options") or {})
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"modules_list[{i}] must be a dict with module_name, dim, heads (and options)") from None
            if kind == "self":
                layer = build_mixer(mechanism, dim, heads, {**options, **extra})
            else:
                layer = JointLayer(mechanism, dim, heads, **extra, **options)
            self.add_module(str(i), layer)
        self._installation: Optional[_Installation] = None
        self.geometry: Optional[LatentGeometry] = None

    # ------------------------------------------------------------------ building
    @classmethod
    def construct_for(
        cls,
        pipe_or_denoiser,
        mechanism: str = "linfusion",
        *,
        inherit: Optional[str] = None,
        install: bool = True,
        **options: Any,
    ) -> "DiffusersAdapter":
        """An adapter shaped like ``pipe_or_denoiser``'s attentions, initialised per the paper, installed.

        ``mechanism``: any registered mixer for UNet/DiT/PixArt (``linfusion``, ``lit``, ``clear``, ``lina``,
        ``dydila``, …); ``clear``, ``lit`` or ``linfusion`` for SD3/FLUX. ``options``: the mechanism's
        options (e.g. ``projection_mid_dim``, ``radius``, ``pool_factor``; ``num_heads`` overrides the head
        count of self-attention mixers; ``projection_mid_dim_scale=k`` gives each LinFusion layer
        ``projection_mid_dim = dim // k``, LinFusion-XL's 16). ``inherit``: copy the teacher's projections: ``"qkv+proj"``
        (default except LinFusion, whose official init is PyTorch's default: ``"none"``), ``"proj"`` or
        ``"none"``. ``install=False`` only builds it. The adapter takes the denoiser's device and dtype.
        """
        denoiser = denoiser_of(pipe_or_denoiser)
        family = family_of(denoiser)
        targets = family.target_attentions(denoiser)
        inherit = default_inherit(mechanism) if inherit is None else inherit
        if inherit not in INHERIT_MODES:
            raise ValueError(f"unknown inherit={inherit!r}; expected one of {INHERIT_MODES}")
        options = dict(options)
        heads_override = options.pop("num_heads", None)
        mid_scale = options.pop("projection_mid_dim_scale", None)
        if mid_scale is not None and "projection_mid_dim" in options:
            raise ValueError("give projection_mid_dim or projection_mid_dim_scale, not both")
        modules_list = []
        for name, attn in targets:
            if family.kind == "self":
                layout = layout_options(mechanism, attn)
                dim = attn.to_q.in_features
                heads = int(attn.heads if heads_override is None else heads_override)
            else:
                if heads_override is not None:
                    raise ValueError("num_heads cannot be changed for a joint attention (the text stream keeps its heads)")
                layout = joint_layout(attn)
                dim, heads = layout.pop("dim"), layout.pop("heads")
            if mid_scale is not None:  # LinFusion-XL's --mid_dim_scale: m = C / scale, per layer
                layout["projection_mid_dim"] = max(1, dim // int(mid_scale))
            modules_list.append({"module_name": name, "dim": dim, "heads": heads, "options": layout})
        adapter = cls(mechanism=mechanism, modules_list=modules_list, mixer_options=options,
                      family=family.name, kind=family.kind)
        param = next(denoiser.parameters())
        nn.Module.to(adapter, device=param.device, dtype=param.dtype)
        for (name, attn), layer in zip(targets, adapter.layers()):
            if family.kind == "self":
                inherit_weights(layer, attn, inherit)
            else:
                inherit_joint(layer, attn, inherit)
        adapter.eval()
        if install:
            adapter.install(denoiser)
        return adapter

    def layers(self) -> List[nn.Module]:
        """The layer of each ``modules_list`` entry, in order."""
        return [self._modules[str(i)] for i in range(len(self.config.modules_list or []))]

    # ------------------------------------------------------------------ installing
    @property
    def installed(self) -> bool:
        return self._installation is not None

    def _check_targets(self, denoiser: nn.Module, family, targets) -> None:
        if self.config.family is not None and family.name != self.config.family:
            raise ValueError(f"this adapter was built for a {self.config.family} denoiser, not {type(denoiser).__name__}")
        expected = [e["module_name"] for e in self.config.modules_list]
        found = [name for name, _ in targets]
        if set(expected) != set(found):
            missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            raise ValueError(
                "the adapter does not match this denoiser's attentions: "
                f"{len(missing)} adapter modules not found ({missing[:3]}…), {len(extra)} attentions not covered ({extra[:3]}…)"
            )
        by_name = dict(targets)
        problems = []
        for entry in self.config.modules_list:
            attn = by_name[entry["module_name"]]
            if attn.to_q.in_features != entry["dim"]:
                problems.append(f"{entry['module_name']}: dim {entry['dim']} vs {attn.to_q.in_features}")
            elif self.config.kind == "joint" and int(attn.heads) != entry["heads"]:
                problems.append(f"{entry['module_name']}: heads {entry['heads']} vs {attn.heads}")
        if problems:
            raise ValueError("the adapter does not match this denoiser: " + "; ".join(problems[:5]))

    def install(self, pipe_or_denoiser) -> "DiffusersAdapter":
        """Put the adapter's layers into the denoiser (moved to its device and dtype); returns ``self``."""
        if self._installation is not None:
            raise RuntimeError("this adapter is already installed; uninstall() it first")
        denoiser = denoiser_of(pipe_or_denoiser)
        family = family_of(denoiser)
        targets = family.target_attentions(denoiser)
        self._check_targets(denoiser, family, targets)
        param = next(denoiser.parameters())
        nn.Module.to(self, device=param.device, dtype=param.dtype)
        geometry = family.geometry(denoiser)
        by_name = dict(targets)
        installation = _Installation(denoiser=denoiser, hook=None)
        for entry, layer in zip(self.config.modules_list, self.layers()):
            name = entry["module_name"]
            attn = by_name[name]
            if self.config.kind == "self":
                parent, leaf = _resolve(denoiser, name)
                setattr(parent, leaf, SelfAttentionShell(layer, geometry))
                installation.restore.append(("self", parent, leaf, attn))
            else:
                originals = {n: attn._modules[n] for n in layer.swapped_names()}
                installation.restore.append(("joint", attn, originals, attn.processor))
                for n in layer.swapped_names():
                    setattr(attn, n, getattr(layer, n))
                layer.processor.geometry = geometry
                attn.set_processor(layer.processor)
        check_call = _check_joint_call if self.config.kind == "joint" else None
        installation.hook = denoiser.register_forward_pre_hook(pre_hook_for(geometry, check_call), with_kwargs=True)
        # an instance attribute shadows the class's save_pretrained until uninstall()
        denoiser.save_pretrained = functools.partial(_save_teacher_and_adapter, self, denoiser)
        self._installation = installation
        self.geometry = geometry
        return self

    def uninstall(self) -> nn.Module:
        """Restore the original attention modules and processors exactly; returns the denoiser."""
        if self._installation is None:
            raise RuntimeError("this adapter is not installed")
        inst = self._installation
        inst.hook.remove()
        inst.denoiser.__dict__.pop("save_pretrained", None)
        for kind, owner, key, original in reversed(inst.restore):
            if kind == "self":
                setattr(owner, key, original)
            else:
                for n, module in key.items():
                    setattr(owner, n, module)
                owner.set_processor(original)
        for layer in self.layers():
            if isinstance(layer, JointLayer):
                layer.processor.geometry = None
        self._installation = None
        self.geometry = None
        return inst.denoiser

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "DiffusersAdapter":
        """Load an adapter folder or hub repo saved by :meth:`save_pretrained`, or a published LinFusion one.

        Strict: a weight the adapter has but the file lacks, an extra one or a wrong shape is a ``ValueError``
        listing them (never a random initialisation); so are a missing folder and an unreadable safetensors
        file. A LinFusion checkpoint (``_class_name`` ``LinFusion`` or ``StableMamba``) goes through
        :func:`linvision.diffusers.linfusion_file.read_linfusion`. kwargs: the hub's (``subfolder``, ``revision``,
        ``cache_dir``, ``token``, ``local_files_only``, ...; offline when ``HF_HUB_OFFLINE`` is set) and
        ``torch_dtype`` (or ``dtype``).
        """
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

        dtype = kwargs.pop("torch_dtype", None) or kwargs.pop("dtype", None)
        unknown = sorted(set(kwargs) - set(HUB_KWARGS))
        if unknown:
            raise TypeError(f"from_pretrained got unsupported arguments {unknown}; expected {HUB_KWARGS} or torch_dtype")
        name = os.fspath(pretrained_model_name_or_path)
        check_source(name, "adapter", cls.config_name, kwargs.get("subfolder"))
        try:
            config = cls.load_config(name, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the adapter config of {name}: {str(err).strip().splitlines()[0]}") from None
        if config.get("_class_name") in LINFUSION_CLASS_NAMES:
            adapter = read_linfusion(cls, name, **kwargs)
        else:
            adapter = cls.from_config(config)
            state = read_sharded_safetensors(name, SAFETENSORS_WEIGHTS_NAME, **kwargs)
            check_and_load(adapter, state, f"{name}/{SAFETENSORS_WEIGHTS_NAME}", strict=True)
        if dtype is not None:
            nn.Module.to(adapter, dtype=dtype)
        return adapter.eval()

    def extra_repr(self) -> str:
        return f"mechanism={self.config.mechanism!r}, family={self.config.family!r}, installed={self.installed}"


Adapter = DiffusersAdapter

__all__ = ["Adapter", "DiffusersAdapter"]

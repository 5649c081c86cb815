"""The classification job's configuration: a documented schema, YAML loading and ``key=value`` overrides.

A config file is plain YAML with up to six sections; every key is optional and falls back to the default
below. ``model`` is free-form: ``name`` plus any keyword arguments of ``timm.create_model`` for that model
(for the ``linvit_*`` models: ``mixer``, ``mixer_kwargs``, ``img_size``, ``patch_size``, ``embed_dim``, ...).
Every other section is checked: an unknown key is an error that lists the valid ones.

Overrides on the command line use dotted keys and YAML scalars: ``train.epochs=3 model.mixer=lit
optim.lr=1e-3 model.mixer=[linear,softmax] train.resume=null``. Numbers in exponent form without a dot
(``5e-4``) are read as floats (YAML 1.2), not as the strings that YAML 1.1 makes of them.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Sequence

import yaml

from linvision.errors import UserError
from linvision.kernels.validation import check_choice, check_float, check_int
from ..configs import resolve_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")  # 5e-4, 1.0E+3


class ConfigError(UserError):
    """A config file or override that does not fit the schema (a :class:`~linvision.errors.UserError`: the jobs
    report it as one line and exit code 2)."""


CHECKS = ("min", "max", "min_open", "max_open", "choices", "length")


def doc_field(default: Any, help: str, **checks) -> Any:
    """A dataclass field with a help text (shown by ``--help``) and the checks :func:`build_section` applies.

    ``checks``: ``min``/``max`` (with ``min_open``/``max_open`` to exclude the bound) for an int or float field
    (or each item of a list of them); ``choices`` for a value from a fixed set; ``length`` for a list of fixed
    length. Every float is also checked finite and every int (or float) real, not a bool.
    """
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        raise TypeError(f"doc_field: unknown check(s) {unknown}; expected {CHECKS}")
    metadata = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_doc = doc_field


@dataclass
class DataConfig:
    """``data:`` where the images come from and how they are augmented (timm's ``create_transform``)."""

    source: str = _doc("folder", "'folder': an ImageFolder tree (root/<split>/<class>/*.jpg, ImageNet layout); "
                       "'digits': scikit-learn's 1797 handwritten digits (8x8, upsampled), offline",
                       choices=("folder", "digits"))
    root: Optional[str] = _doc(None, "folder source: the directory holding the train and val splits")
    train_split: str = _doc("train", "folder source: train sub-directory of root")
    val_split: str = _doc("val", "folder source: validation sub-directory of root")
    val_fraction: float = _doc(0.2, "digits source: fraction held out for validation (stratified, fixed split)",
                               min=0, max=1, min_open=True, max_open=True)
    max_train_samples: Optional[int] = _doc(None, "use only the first N training images (smoke tests)", min=1)
    max_val_samples: Optional[int] = _doc(None, "use only the first N validation images (smoke tests)", min=1)
    img_size: int = _doc(224, "training and evaluation resolution (square)", min=1)
    batch_size: int = _doc(128, "images per process per micro-batch", min=1)
    eval_batch_size: Optional[int] = _doc(None, "images per process per evaluation batch (default: 2 x batch_size)",
                                          min=1)
    num_workers: int = _doc(4, "data-loading worker processes per training process", min=0)
    interpolation: str = _doc("bicubic", "resize interpolation: bilinear, bicubic, random",
                              choices=("bilinear", "bicubic", "random"))
    mean: List[float] = _doc(list(IMAGENET_MEAN), "normalisation mean (RGB)", length=3)
    std: List[float] = _doc(list(IMAGENET_STD), "normalisation std (RGB)", length=3, min=0, min_open=True)
    crop_pct: float = _doc(0.875, "evaluation: resize to img_size / crop_pct, then centre-crop img_size",
                           min=0, max=1, min_open=True)
    scale: List[float] = _doc([0.08, 1.0], "RandomResizedCrop area range", length=2, min=0, max=1, min_open=True)
    ratio: List[float] = _doc([0.75, 1.3333333333333333], "RandomResizedCrop aspect-ratio range",
                              length=2, min=0, min_open=True)
    hflip: float = _doc(0.5, "horizontal flip probability", min=0, max=1)
    color_jitter: Optional[float] = _doc(0.4, "colour jitter strength (ignored by timm when auto_augment is set; "
                                         "applied after the grey/solarize/blur op with three_augment)", min=0)
    auto_augment: Optional[str] = _doc(None, "timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1' (RandAugment)")
    three_augment: bool = _doc(False, "DeiT-III's 3-Augment instead of timm's transform: crop + flip, then one of "
                               "grayscale, solarize, Gaussian blur, then colour jitter (excludes auto_augment)")
    simple_random_crop: bool = _doc(False, "three_augment: DeiT-III's --src, resize to img_size and a random crop "
                                    "with 4 px reflect padding instead of the RandomResizedCrop")
    reprob: float = _doc(0.0, "random erasing probability", min=0, max=1)
    remode: str = _doc("pixel", "random erasing fill: const, rand, pixel", choices=("const", "rand", "pixel"))
    recount: int = _doc(1, "random erasing count", min=1)


@dataclass
class MixupConfig:
    """``mixup:`` batch mixing with timm's ``Mixup`` (soft targets, SoftTargetCrossEntropy)."""

    mixup: float = _doc(0.0, "mixup alpha (0: off)", min=0)
    cutmix: float = _doc(0.0, "cutmix alpha (0: off)", min=0)
    prob: float = _doc(1.0, "probability of mixing a batch", min=0, max=1)
    switch_prob: float = _doc(0.5, "probability of cutmix instead of mixup when both are on", min=0, max=1)
    mode: str = _doc("batch", "'batch', 'pair' or 'elem'", choices=("batch", "pair", "elem"))


@dataclass
class OptimConfig:
    """``optim:`` the optimizer (timm's ``create_optimizer_v2``: no weight decay on norms, biases and
    the model's ``no_weight_decay()`` parameters such as the position embedding)."""

    name: str = _doc("adamw", "timm optimizer name: adamw, lamb, sgd, ...")
    lr: float = _doc(5.0e-4, "peak learning rate (before batch scaling, see lr_base_batch)", min=0, min_open=True)
    lr_base_batch: Optional[int] = _doc(512, "scale lr by global_batch / lr_base_batch (DeiT); null: use lr as is",
                                        min=1)
    weight_decay: float = _doc(0.05, "decoupled weight decay", min=0)
    betas: Optional[List[float]] = _doc(None, "Adam betas (null: the optimizer's default)",
                                        length=2, min=0, max=1, max_open=True)
    eps: Optional[float] = _doc(None, "Adam epsilon (null: the optimizer's default)", min=0, min_open=True)
    momentum: float = _doc(0.9, "momentum of SGD-like optimizers", min=0, max=1)
    clip_grad: Optional[float] = _doc(None, "clip the global gradient norm to this value (null: no clipping)",
                                      min=0, min_open=True)


@dataclass
class TrainConfig:
    """``train:`` schedule, loop and run directory (an ``accelerate`` loop)."""

    output_dir: str = _doc("runs/classify", "run directory: config, checkpoint, metrics.jsonl, plot, weights")
    seed: int = _doc(0, "seeds model init, data order, augmentation, mixup and drop-path", min=0)
    epochs: int = _doc(300, "training epochs", min=1)
    warmup_epochs: float = _doc(5.0, "linear warmup from warmup_lr, in epochs (stepped per optimizer step)", min=0)
    warmup_lr: float = _doc(1.0e-6, "learning rate at step 0", min=0)
    min_lr: float = _doc(1.0e-5, "learning rate at the end of the cosine decay", min=0)
    label_smoothing: float = _doc(0.1, "label smoothing (inside Mixup's soft targets when mixing is on)",
                                  min=0, max=1, max_open=True)
    bce_loss: bool = _doc(False, "binary cross-entropy per class (timm's BinaryCrossEntropy, DeiT-III's --bce-loss) "
                          "instead of softmax cross-entropy, on the (mixup) targets")
    bce_target_thresh: Optional[float] = _doc(None, "bce_loss: targets above this become 1, the rest 0 (DeiT-III and "
                                              "pLSTM: 0.0, every class in a mix is positive); null: soft targets",
                                              min=0, max=1, max_open=True)
    accum_steps: int = _doc(1, "gradient accumulation: micro-batches per optimizer step", min=1)
    mixed_precision: Optional[str] = _doc(None, "'no', 'bf16' or 'fp16'; null: from `accelerate launch`/config",
                                          choices=("no", "bf16", "fp16"))
    cpu: bool = _doc(False, "force CPU even when an accelerator is present")
    threads: Optional[int] = _doc(None, "torch CPU threads per process during the run (null: torch's default); "
                                  "1 is fastest for tiny models and on busy machines", min=1)
    checkpoint_every_steps: Optional[int] = _doc(None, "also checkpoint every N optimizer steps (always at epoch end)",
                                                 min=1)
    max_steps: Optional[int] = _doc(None, "stop (after checkpointing) at this global optimizer step, as if killed",
                                    min=1)
    resume: Optional[str] = _doc(None, "null: start fresh; 'auto': continue from output_dir/checkpoint.pt if "
                                 "present; or a checkpoint path")
    log_every: int = _doc(10, "refresh the progress bar's loss every N optimizer steps", min=1)


@dataclass
class EmaConfig:
    """``ema:`` model EMA (timm's ``ModelEmaV3``), evaluated next to the model each epoch."""

    enabled: bool = _doc(True, "keep an exponential moving average of the weights")
    decay: float = _doc(0.99996, "EMA decay per optimizer step", min=0, max=1)
    warmup: bool = _doc(False, "ramp the decay up from 0 (timm's use_warmup) for short runs")


SECTIONS = MappingProxyType(
    {"data": DataConfig, "mixup": MixupConfig, "optim": OptimConfig, "train": TrainConfig, "ema": EmaConfig})


@dataclass
class Config:
    """The whole job configuration: the typed sections plus the free-form ``model`` dict."""

    model: Dict[str, Any]
    data: DataConfig = field(default_factory=DataConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dict (YAML/JSON/``torch.save(weights_only)`` safe)."""
        out = {"model": copy.deepcopy(self.model)}
        out.update({name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS})
        return out

    def model_kwargs(self) -> Dict[str, Any]:
        """``timm.create_model`` keyword arguments: the ``model`` section without ``name``."""
        return {k: copy.deepcopy(v) for k, v in self.model.items() if k != "name"}


# --- parsing ----------------------------------------------------------------------------------------------


def _yaml12_floats(value: Any) -> Any:
    """Strings YAML 1.1 leaves unparsed but YAML 1.2 reads as floats (``5e-4``) become floats."""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)
    if isinstance(value, list):
        return [_yaml12_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml12_floats(v) for k, v in value.items()}
    return value


def parse_value(text: str) -> Any:
    """An override's value: a YAML scalar or flow collection (``3``, ``lit``, ``null``, ``[a, b]``, ``1e-3``)."""
    try:
        return _yaml12_floats(yaml.safe_load(text))
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse override value {text!r} as YAML: {err}") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the field type ``tp`` (int → float only), or a ConfigError."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], key)
    if origin in (list, List, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return copy.deepcopy(dict(value))
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def build_section(cls, values: Any, name: str):
    """A checked instance of dataclass ``cls`` from the mapping ``values`` of section ``name`` (shared by the jobs):
    an unknown key is a :class:`ConfigError` listing the valid ones; values are type-checked."""
    return _build_section(cls, values, name)


def _build_section(cls, values: Any, name: str):
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"section {name!r} must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"valid keys in {name!r}: {', '.join(fields)}")
    section = cls(**{k: _check_type(v, hints[k], f"{name}.{k}") for k, v in values.items()})
    for key, f in fields.items():  # defaults too: a wrong default is caught by the tests, not by a user
        try:
            _check_value(getattr(section, key), _scalar_type(hints[key]), f.metadata, f"{name}.{key}")
        except ConfigError as err:
            if typing.get_origin(hints[key]) is typing.Union:  # Optional: say that null is valid too
                raise ConfigError(str(err).replace(", got", " or null, got", 1)) from None
            raise
    return section


def _scalar_type(tp: Any) -> Any:
    """The item type behind ``Optional[...]`` and ``List[...]`` (``float`` for ``Optional[List[float]]``)."""
    while typing.get_origin(tp) in (typing.Union, list, List, Sequence):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return tp


def _check_value(value: Any, item_type: Any, checks: Mapping[str, Any], key: str) -> None:
    """The field's ``doc_field`` checks on ``value`` (None passes: the type check allowed it); ConfigError."""
    if value is None:
        return
    if isinstance(value, list):
        length = checks.get("length")
        if length is not None and len(value) != length:
            raise ConfigError(f"{key} needs {length} values, got {len(value)}: {value!r}")
        for i, item in enumerate(value):
            _check_value(item, item_type, {k: v for k, v in checks.items() if k != "length"}, f"{key}[{i}]")
        return
    bounds = {k: checks[k] for k in ("min", "max", "min_open", "max_open") if k in checks}
    try:
        if "choices" in checks:
            check_choice(key, value, checks["choices"])
        elif item_type is float:
            check_float(key, value, **bounds)
        elif item_type is int:
            check_int(key, value, **bounds)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def section_tree(tree: Any, valid: Sequence[str]) -> Mapping[str, Any]:
    """The top level of a job's config tree (the YAML file after overrides): a mapping whose keys are all in
    ``valid`` (None: empty), else ``ConfigError`` listing the valid sections. A ``train.mixed_precision`` that
    YAML 1.1 read as false (a bare ``no``) becomes ``"no"``."""
    if tree is None:
        tree = {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    unknown = [k for k in tree if k not in valid]
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(map(str, unknown))}; valid sections: {', '.join(valid)}")
    train = tree.get("train")
    if isinstance(train, Mapping) and train.get("mixed_precision") is False:
        tree = dict(tree, train=dict(train, mixed_precision="no"))
    return tree


def build_sections(tree: Mapping[str, Any], sections: Mapping[str, Any]) -> Dict[str, Any]:
    """Each section dataclass of ``sections`` built and checked from ``tree`` (see :func:`build_section`)."""
    return {name: build_section(cls, tree.get(name), name) for name, cls in sections.items()}


def build_config(tree: Any) -> Config:
    """A checked :class:`Config` from a nested dict (the YAML file after overrides)."""
    tree = section_tree(tree, ["model", *SECTIONS])
    model = tree.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
        raise ConfigError("model: a mapping with at least 'name' (a timm model name) is required, "
                          "e.g. model: {name: linvit_tiny_patch16_224, mixer: linear}")
    cfg = Config(model=dict(model), **build_sections(tree, SECTIONS))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that the types and each field's own checks (see :func:`doc_field`) cannot express."""
    d, m = cfg.data, cfg.mixup
    if d.source == "folder" and not d.root:
        raise ConfigError("data.root is required when data.source is 'folder' (a directory with train/ and val/)")
    if not cfg.train.output_dir:
        raise ConfigError("train.output_dir must be a folder name, got an empty string")
    if (m.mixup > 0 or m.cutmix > 0) and m.mode == "batch" and d.batch_size % 2:
        raise ConfigError(f"mixup in 'batch' mode needs an even data.batch_size, got {d.batch_size}")
    if d.scale[0] > d.scale[1] or d.ratio[0] > d.ratio[1]:
        raise ConfigError(f"data.scale and data.ratio are [low, high] ranges, got {d.scale} and {d.ratio}")
    _validate_recipe_switches(d, cfg.train)


def _validate_recipe_switches(d: DataConfig, t: TrainConfig) -> None:
    """3-Augment and BCE: the combinations that cannot work."""
    if d.three_augment and d.auto_augment:
        raise ConfigError(f"data.three_augment and data.auto_augment={d.auto_augment!r} exclude each other "
                          "(3-Augment replaces the auto-augment policy); set data.auto_augment=null")
    if d.simple_random_crop and not d.three_augment:
        raise ConfigError("data.simple_random_crop is a 3-Augment option: set data.three_augment=true as well")
    if d.simple_random_crop and d.interpolation == "random":
        raise ConfigError("data.simple_random_crop resizes with one fixed interpolation: set data.interpolation "
                          "to bicubic or bilinear")
    if t.bce_target_thresh is not None and not t.bce_loss:
        raise ConfigError("train.bce_target_thresh applies only with train.bce_loss=true")


def set_override(tree: Dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` to a nested dict in place (creating dicts on the way)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    parts = key.strip().split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = parse_value(text)


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (``yaml.safe_load``), apply ``overrides`` (``a.b=value``), check and return it."""
    return build_config(load_tree(path, overrides))


def load_tree(path: Optional[str], overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The nested dict of a YAML file (``yaml.safe_load``, YAML 1.2 floats) with ``overrides`` applied, unchecked."""
    tree: Dict[str, Any] = {}
    if path is not None:
        p = Path(resolve_config(path))
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file {path} cannot be read: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
        tree = _yaml12_floats(tree)
    for assignment in overrides:
        set_override(tree, assignment)
    return tree


def describe() -> str:
    """Every config key with its default and help, for ``--help``."""
    lines = ["config keys (section.key: default  help):", "  model.name: (required)  any timm model name; "
             "other model.* keys are create_model kwargs (e.g. model.mixer=linear)"]
    return "\n".join(lines + describe_sections(SECTIONS))


def valid_values(checks: Mapping[str, Any]) -> str:
    """What a field's ``doc_field`` checks allow, for help texts: ``" [valid: 0 < x <= 1]"``, or ``""``."""
    parts = []
    if "choices" in checks:
        parts.append("one of " + ", ".join(map(str, checks["choices"])))
    lo, hi = checks.get("min"), checks.get("max")
    below, above = ("<" if checks.get("min_open") else "<="), ("<" if checks.get("max_open") else "<=")
    if lo is not None and hi is not None:
        parts.append(f"{lo} {below} x {above} {hi}")
    elif lo is not None:
        parts.append(f"x {below.replace('<', '>')} {lo}")
    elif hi is not None:
        parts.append(f"x {above} {hi}")
    if "length" in checks:
        parts.append(f"{checks['length']} values")
    return f" [valid: {'; '.join(parts)}]" if parts else ""


def describe_sections(sections: Mapping[str, Any], headers: bool = False) -> List[str]:
    """One ``  section.key: default  help [valid: ...]`` line per field of each dataclass in ``sections``; with
    ``headers``, each section's lines follow a ``section:  what it is`` line (its docstring)."""
    lines = []
    for name, cls in sections.items():
        if headers:
            lines.append(f"{name}:  {(cls.__doc__ or '').replace(f'``{name}:``', '').strip()}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {name}.{f.name}: {default!r}  {f.metadata.get('help', '')}{valid_values(f.metadata)}")
    return lines


__all__ = ["Config", "ConfigError", "DataConfig", "EmaConfig", "MixupConfig", "OptimConfig", "TrainConfig",
           "build_config", "build_section", "build_sections", "describe", "describe_sections", "doc_field", "load_config", "load_tree",
           "parse_value", "section_tree", "set_override", "valid_values"]

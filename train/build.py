"""The model-side training objects of the classification job, built from a :class:`~linvision.train.config.Config`:
model (any timm model, ``linvit_*`` included), optimizer, loss, mixup and EMA."""
from __future__ import annotations

from typing import Optional, Tuple

import timm
import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn

from .config import Config, ConfigError


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """``timm.create_model(cfg.model['name'], num_classes=<from the data>, **other model keys)``.

    Importing :mod:`linvision` first registers its models (``linvit_*``, ``nalaformer_*``,
    ``plstm_vis_*``, ``infvit_*``). Unknown names and options a model
    rejects become a :class:`ConfigError` naming the ``model`` section.
    """
    import linvision  # noqa: F401  (registers the linvision models in timm)

    name = cfg.model["name"]
    kwargs = cfg.model_kwargs()
    if not timm.is_model(name):
        ours = timm.list_models(["linvit_*", "nalaformer_*", "plstm_vis_*", "infvit_*", "care_*"])
        raise ConfigError(f"model.name: unknown model {name!r}; linvision models: "
                          f"{', '.join(ours)} (or any timm model name)")
    given = kwargs.get("num_classes")
    if given is not None and given != num_classes:
        raise ConfigError(f"model.num_classes={given} but the data has {num_classes} classes")
    kwargs["num_classes"] = num_classes
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {name} rejected its options {sorted(kwargs)}: {err}") from None


def check_input_size(model: nn.Module, cfg: Config, what: Optional[str] = None, remedy: Optional[str] = None) -> None:
    """ConfigError unless ``model`` takes ``data.img_size`` images: one image of zeros through the model in eval
    mode on the CPU, before anything is written (timm's ViTs assert their built size; our models raise).
    ``what`` names the model and ``remedy`` says what to change (defaults: classify's ``model`` section)."""
    size = cfg.data.img_size
    what = what or f"{cfg.model['name']} as configured"
    remedy = remedy or f"build it at that size (model.img_size={size}) or give a size it takes"
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except (AssertionError, ValueError) as err:
        raise ConfigError(f"data.img_size={size}: {what} does not take {size}x{size} images ({err}); {remedy}"
                          ) from None
    finally:
        model.train(was_training)


def scaled_lr(cfg: Config, global_batch: int) -> float:
    """``optim.lr``, times ``global_batch / optim.lr_base_batch`` when a base batch is given (DeiT's rule)."""
    if cfg.optim.lr_base_batch:
        return cfg.optim.lr * global_batch / cfg.optim.lr_base_batch
    return cfg.optim.lr


def build_optimizer(model: nn.Module, cfg: Config, lr: float) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2``: weight decay on weights only (not on biases, norms or the names in
    ``model.no_weight_decay()``, e.g. the position embedding and class token)."""
    o = cfg.optim
    extra = {}
    if o.betas is not None:
        extra["betas"] = tuple(o.betas)
    if o.eps is not None:
        extra["eps"] = o.eps
    try:
        return create_optimizer_v2(model, opt=o.name, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum,
                                   filter_bias_and_bn=True, **extra)
    except (AssertionError, ValueError, TypeError) as err:
        raise ConfigError(f"optim: cannot create optimizer {o.name!r}: {err}") from None


def build_mixup(cfg: Config, num_classes: int) -> Optional[Mixup]:
    """timm's ``Mixup`` (with label smoothing folded into the soft targets), or None when both alphas are 0."""
    m = cfg.mixup
    if m.mixup <= 0 and m.cutmix <= 0:
        return None
    return Mixup(mixup_alpha=m.mixup, cutmix_alpha=m.cutmix, prob=m.prob, switch_prob=m.switch_prob, mode=m.mode,
                 label_smoothing=cfg.train.label_smoothing, num_classes=num_classes)


def build_criterion(cfg: Config, mixing: bool, num_classes: Optional[int] = None) -> nn.Module:
    """The training loss, chosen as timm's ``train.py`` does.

    - ``train.bce_loss`` (DeiT-III): timm's ``BinaryCrossEntropy``, the mean over classes and samples of a
      per-class sigmoid cross-entropy. Under mixup/cutmix it takes the soft targets (label smoothing is
      already in them); otherwise it one-hot encodes the labels with ``train.label_smoothing``. With
      ``train.bce_target_thresh`` the targets are binarised first (``target > thresh``): DeiT-III's
      ``targets.gt(0.0)`` and pLSTM's ``y > 0`` are ``bce_target_thresh: 0.0``.
    - otherwise: soft-target cross-entropy under mixup/cutmix, else cross-entropy with label smoothing.

    ``num_classes`` (when given) checks that label smoothing leaves the thresholded targets meaningful.
    """
    t = cfg.train
    if t.bce_loss:
        off_value = t.label_smoothing / num_classes if num_classes else 0.0
        if t.bce_target_thresh is not None and off_value > t.bce_target_thresh:
            raise ConfigError(f"train.bce_target_thresh={t.bce_target_thresh} is below the smoothed target of "
                              f"every class ({t.label_smoothing}/{num_classes}), so every class would count as "
                              "positive; set train.label_smoothing=0 (as DeiT-III) or a higher threshold")
        return BinaryCrossEntropy(smoothing=0.0 if mixing else t.label_smoothing, target_threshold=t.bce_target_thresh)
    if mixing:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)


def build_ema(cfg: Config, model: nn.Module) -> Optional[ModelEmaV3]:
    """timm's ``ModelEmaV3`` copy of ``model`` (same device), or None when ``ema.enabled`` is false."""
    if not cfg.ema.enabled:
        return None
    return ModelEmaV3(model, decay=cfg.ema.decay, use_warmup=cfg.ema.warmup)


def steps_and_warmup(cfg: Config, steps_per_epoch: int) -> Tuple[int, int]:
    """Total optimizer steps of the run and warmup steps (``warmup_epochs`` in steps, rounded)."""
    return steps_per_epoch * cfg.train.epochs, int(round(cfg.train.warmup_epochs * steps_per_epoch))


__all__ = ["build_criterion", "build_ema", "build_mixup", "build_model", "build_optimizer", "check_input_size",
           "scaled_lr", "steps_and_warmup"]

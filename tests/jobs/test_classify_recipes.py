"""``linvision classify``'s DeiT-III switches: BCE loss, 3-Augment, and a short run of the pLSTM-Vis recipe."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from timm.data.random_erasing import RandomErasing
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchvision import transforms

from linvision.train.augment import GraySolarizeOrBlur
from linvision.train.build import build_criterion, build_mixup
from linvision.train.classify import run
from linvision.train.config import ConfigError, build_config, load_config
from linvision.train.data import SeededAugment, build_transforms
from linvision.train.rng import seeded
from tests.jobs.test_classify import ROOT, tiny

LOGITS = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])


def _bce_by_hand(logits: torch.Tensor, targets) -> float:
    """Mean over samples and classes of -(t log sigmoid(x) + (1 - t) log(1 - sigmoid(x)))."""
    terms = []
    for row, trow in zip(logits.tolist(), targets):
        for x, t in zip(row, trow):
            p = 1.0 / (1.0 + math.exp(-x))
            terms.append(-(t * math.log(p) + (1.0 - t) * math.log(1.0 - p)))
    return sum(terms) / len(terms)


def _cfg(**sections):
    return build_config(tiny(Path("x"), **sections))


# --- BCE ------------------------------------------------------------------------------------------------


def test_bce_criterion_matches_a_hand_computation():
    # labels: one-hot with label smoothing 0.1 over 3 classes (timm: off = 0.1/3, on = 0.9 + 0.1/3)
    loss = build_criterion(_cfg(train={"bce_loss": True, "label_smoothing": 0.1}), mixing=False, num_classes=3)
    assert isinstance(loss, BinaryCrossEntropy)
    off, on = 0.1 / 3, 0.9 + 0.1 / 3
    expected = _bce_by_hand(LOGITS, [[on, off, off], [off, off, on]])
    assert float(loss(LOGITS, torch.tensor([0, 2]))) == pytest.approx(expected, rel=1e-6)
    # mixup's soft targets as they are (the smoothing is already in them)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
    loss = build_criterion(_cfg(train={"bce_loss": True, "label_smoothing": 0.1}), mixing=True, num_classes=3)
    assert float(loss(LOGITS, soft)) == pytest.approx(_bce_by_hand(LOGITS, soft.tolist()), rel=1e-6)
    # DeiT-III / pLSTM: every class in the mix is a positive (targets > 0)
    loss = build_criterion(_cfg(train={"bce_loss": True, "bce_target_thresh": 0.0, "label_smoothing": 0.0}),
                           mixing=True, num_classes=3)
    expected = _bce_by_hand(LOGITS, [[1, 1, 0], [0, 1, 1]])
    assert float(loss(LOGITS, soft)) == pytest.approx(expected, rel=1e-6)
    # without bce_loss: the cross-entropies as before
    assert isinstance(build_criterion(_cfg(), mixing=True), SoftTargetCrossEntropy)
    assert isinstance(build_criterion(_cfg(), mixing=False), nn.CrossEntropyLoss)


def test_bce_is_finite_on_mixed_and_unmixed_batches():
    cfg = _cfg(train={"bce_loss": True, "bce_target_thresh": 0.0, "label_smoothing": 0.0},
               mixup={"mixup": 0.8, "cutmix": 1.0})
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 7, 9])
    logits = torch.randn(4, 10, requires_grad=True)
    mixed_x, target = build_mixup(cfg, 10)(x, y)
    assert target.shape == (4, 10) and mixed_x.shape == x.shape
    for mixing, t in ((True, target), (False, y)):
        loss = build_criterion(cfg, mixing=mixing, num_classes=10)(logits, t)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_bce_config_errors():
    with pytest.raises(ConfigError, match="bce_target_thresh applies only with train.bce_loss"):
        _cfg(train={"bce_target_thresh": 0.0})
    with pytest.raises(ConfigError, match=r"bce_target_thresh must be in \[0, 1\)"):
        _cfg(train={"bce_loss": True, "bce_target_thresh": 1.0})
    # smoothing lifts every class above a 0.0 threshold: all targets would be 1
    smoothed = _cfg(train={"bce_loss": True, "bce_target_thresh": 0.0, "label_smoothing": 0.1})
    with pytest.raises(ConfigError, match="every class would count as positive"):
        build_criterion(smoothed, mixing=True, num_classes=10)


# --- 3-Augment ------------------------------------------------------------------------------------------


def _image(size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _which_op(source: Image.Image, out: Image.Image) -> str:
    a = np.asarray(out).astype(int)
    if (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all():
        return "grayscale"
    if np.array_equal(a, np.asarray(ImageOps.solarize(source, threshold=128))):
        return "solarize"
    return "blur"


def test_three_augment_ops_each_occur_and_do_what_they_say():
    img, op = _image(), GraySolarizeOrBlur()
    grey = np.asarray(op.apply(img, "grayscale"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    solar, src = np.asarray(op.apply(img, "solarize")).astype(int), np.asarray(img).astype(int)
    assert np.array_equal(solar, np.where(src >= 128, 255 - src, src))
    blurred = np.asarray(op.apply(img, "blur")).astype(float)
    assert np.abs(np.diff(blurred, axis=0)).mean() < 0.8 * np.abs(np.diff(src, axis=0)).mean()  # smoother
    seen = []
    for seed in range(30):
        with seeded(seed):
            seen.append(_which_op(img, op(img)))
    assert set(seen) == {"grayscale", "solarize", "blur"}, seen
    with pytest.raises(ValueError, match="unknown op"):
        op.apply(img, "sharpen")


def test_three_augment_transform_shape_determinism_and_pipeline():
    cfg = _cfg(data={"three_augment": True, "img_size": 16, "hflip": 0.5, "color_jitter": None,
                     "mean": [0.5] * 3, "std": [0.5] * 3, "reprob": 0.0})
    tf = build_transforms(cfg.data, True)
    kinds = [type(t) for t in tf.transforms]
    assert GraySolarizeOrBlur in kinds and transforms.ColorJitter not in kinds and RandomErasing not in kinds

    class Images:
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return tf(_image(20 + index))

    data = SeededAugment(Images(), seed=3)
    first = [data[(1, i)] for i in range(8)]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.float32 for x in first)
    assert all(torch.equal(a, data[(1, i)]) for i, a in enumerate(first))  # same (seed, epoch, index): same image
    assert not torch.equal(data[(2, 0)], first[0])  # another epoch: another augmentation
    grey = [bool((x[0] == x[1]).all() and (x[1] == x[2]).all()) for x in [data[(e, 0)] for e in range(12)]]
    assert any(grey) and not all(grey)  # the grey op happens, and not always
    # colour jitter, random erasing, DeiT-III's --src crop
    cfg = _cfg(data={"three_augment": True, "simple_random_crop": True, "img_size": 16, "color_jitter": 0.3,
                     "reprob": 0.25})
    tf = build_transforms(cfg.data, True)
    kinds = [type(t) for t in tf.transforms]
    assert kinds[:2] == [transforms.Resize, transforms.RandomCrop] and tf.transforms[1].padding_mode == "reflect"
    assert transforms.ColorJitter in kinds and kinds[-1] is RandomErasing
    with seeded(0):
        out = tf(_image(20))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


def test_three_augment_config_errors():
    with pytest.raises(ConfigError, match="three_augment and data.auto_augment='rand-m9-mstd0.5-inc1' exclude"):
        _cfg(data={"three_augment": True, "auto_augment": "rand-m9-mstd0.5-inc1"})
    with pytest.raises(ConfigError, match="simple_random_crop is a 3-Augment option"):
        _cfg(data={"simple_random_crop": True})
    with pytest.raises(ConfigError, match="fixed interpolation"):
        _cfg(data={"three_augment": True, "simple_random_crop": True, "interpolation": "random"})


# --- a run ----------------------------------------------------------------------------------------------


def test_plstm_recipe_runs_on_digits(tmp_path):
    """The shipped pLSTM-Vis-T recipe (LAMB, BCE on targets > 0, 3-Augment, mixup/cutmix, clipping), shrunk to a
    one-block model on 32 digits at 16x16: 4 optimizer steps with a finite loss."""
    cfg = load_config(str(ROOT / "configs/classify/plstm_vis_t.yaml"), [
        "data.source=digits", "data.img_size=16", "model.img_size=16", "model.patch_size=4", "model.embed_dim=16",
        "model.num_heads=2", "model.num_blocks=1", "data.batch_size=8", "data.num_workers=0",
        "data.max_train_samples=32", "data.max_val_samples=16", "train.epochs=1", "train.warmup_epochs=0.5",
        "optim.lr_base_batch=null", "train.mixed_precision=no", "train.threads=1", "train.resume=null",
        "train.checkpoint_every_steps=null", f"train.output_dir={tmp_path}"])
    assert (cfg.optim.name, cfg.train.bce_loss, cfg.train.bce_target_thresh) == ("lamb", True, 0.0)
    assert cfg.data.three_augment and cfg.data.auto_augment is None and cfg.mixup.cutmix == 1.0
    result = run(cfg)
    assert result["step"] == 4 and math.isfinite(result["train_loss"]) and 0 < result["train_loss"] < 1
    assert math.isfinite(result["val_loss"]) and 0 <= result["val_top1"] <= 100

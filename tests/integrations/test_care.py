"""CARE Transformer (``care_s0/s1/s2``): official parity, the paper's counts, and the timm model interface."""
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import linvision  # noqa: F401  (registers the models)
from linvision.models.care import CARETransformer
from tests.helpers import rel_err

FIXTURE = Path(__file__).parents[1] / "fixtures" / "care" / "care_tiny.safetensors"
# The official CARENets arguments of the fixture (tests/fixtures/care/README.md).
TINY = dict(depths=(1, 1, 2, 1), feat_dims=(6, 12, 24, 24), mem_dims=(2, 4, 8, 8), ratios=((2, 2),) * 4,
            att_head_dim=(1, 1, 4, 4), cls_dim=64, num_classes=10)
# Paper Table / README: params (M), GMACs at 224².
PAPER = {"care_s0": (7.3, 0.7), "care_s1": (9.6, 1.0), "care_s2": (19.5, 1.9)}
# Counted from the official CARETrans_S* classes (both heads; FlopCounterMode, MACs = FLOPs / 2).
OFFICIAL = {"care_s0": (7_340_000, 717_796_096), "care_s1": (9_602_424, 1_028_617_600),
            "care_s2": (19_481_288, 1_923_109_952)}


def _tiny_official():
    data = load_file(str(FIXTURE))
    params = {k[len("param."):]: v for k, v in data.items() if k.startswith("param.")}
    model = CARETransformer(**TINY)
    missing, unexpected = model.load_state_dict(params, strict=True)
    assert not missing and not unexpected
    return model.eval(), data


def test_matches_official_carenets():
    model, data = _tiny_official()
    with torch.no_grad():
        features = model.forward_features(data["input.x"])
        out = model(data["input.x"])
    assert rel_err(features, data["features"]) < 1e-5
    assert out.shape == data["output"].shape and rel_err(out, data["output"]) < 1e-5


def test_fixture_exercises_the_linear_attention():
    """Uniform attention (q = k = 0) instead of the learned one misses the official output clearly."""
    model, data = _tiny_official()
    with torch.no_grad():
        for block in model.stages[2].blocks:
            block.token_mixer.qk.weight.zero_()
            block.token_mixer.qk.bias.zero_()
        assert rel_err(model(data["input.x"]), data["output"]) > 1e-3


@pytest.mark.parametrize("name", sorted(PAPER))
def test_counts_match_official_and_paper(name):
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    macs = counter.get_total_flops() // 2
    assert (params, macs) == pytest.approx(OFFICIAL[name], rel=1e-3)
    paper_params, paper_gmacs = PAPER[name]
    assert abs(params / 1e6 / paper_params - 1) < 0.01
    assert abs(macs / 1e9 - paper_gmacs) <= 0.05  # the paper rounds to one decimal


def test_timm_interface():
    torch.manual_seed(0)
    model = CARETransformer(**TINY).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 64, 1, 1) and model.num_features == 64
        logits = model.forward_head(feats)
        assert torch.equal(logits, model(x)) and logits.shape == (2, 10)
        pre = model.forward_head(feats, pre_logits=True)
        model.reset_classifier(0)
        assert torch.equal(model(x), pre) and pre.shape == (2, 64)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier()[1].out_features == 5
    model.train()
    assert model(x).shape == (2, 5)  # plain training output: the mean of both heads
    model.set_distilled_training(True)
    head, dist = model(x)
    assert head.shape == dist.shape == (2, 5)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(5, "max")
    with torch.no_grad():
        half = model.eval().to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


def test_features_only_and_grad_checkpointing():
    model = timm.create_model("care_s0", features_only=True, depths=(1, 1, 1, 1))
    maps = model(torch.randn(1, 3, 64, 96))
    assert [m.shape[1] for m in maps] == model.feature_info.channels() == [32, 64, 128, 1024]
    assert [64 // m.shape[2] for m in maps] == model.feature_info.reduction() == [4, 8, 16, 32]
    two = timm.create_model("care_s0", features_only=True, out_indices=(0, 1), depths=(1, 1, 1, 1))
    assert [m.shape[1] for m in two(torch.randn(1, 3, 32, 32))] == [32, 64]
    torch.manual_seed(0)
    net = CARETransformer(**TINY)
    x = torch.randn(2, 3, 32, 32)
    ref = net(x)
    net.set_grad_checkpointing(True)
    out = net(x)
    out.sum().backward()
    assert torch.allclose(out, ref) and net.stem[0].weight.grad is not None


@pytest.mark.parametrize("kwargs,match", [
    (dict(cls_dim=100), "cls_dim"),
    (dict(depths=(1, 1, 1)), "entries"),
    (dict(att_head_dim=(1, 1, 3, 4)), "multiple of att_head_dim"),
    (dict(global_pool="max"), "global_pool"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CARETransformer(**dict(TINY, **kwargs))

"""The shipped CARE and TransNormer-hybrid recipes: each builds (shrunk) through the classification job's
``build_model`` and trains one step on a tiny batch."""
import pytest
import torch

from linvision.train.build import build_model
from linvision.train.config import load_config
from tests.jobs.test_classify import ROOT

SHRINK = {
    "care_s0": ["model.depths=[1,1,1,1]"],
    "care_s1": ["model.depths=[1,1,1,1]"],
    "care_s2": ["model.depths=[1,1,1,1]"],
    # the 12-block mixer list as shipped, on a 4x4 grid of 8-px patches at width 16
    "linvit_small_transnormer": ["model.img_size=32", "model.patch_size=8", "model.embed_dim=16",
                                 "model.num_heads=2", "model.mixer_kwargs.transnormer_diag.block_size=3"],
}


@pytest.mark.parametrize("recipe", sorted(SHRINK))
def test_recipe_builds_and_trains_a_step(recipe):
    cfg = load_config(str(ROOT / f"configs/classify/{recipe}.yaml"), SHRINK[recipe] + ["data.source=digits"])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=10)
    if recipe.startswith("linvit"):
        assert model.mixers == ("transnormer_diag",) * 6 + ("transnormer",) * 6
        assert model.blocks[0].attn.block_size == (3, 3)
    x = torch.randn(2, 3, 32, 32)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)

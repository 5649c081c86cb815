"""LION's named ViTs in timm: parameter counts equal to the official models, forward at a small size."""
import pytest
import timm
import torch

import linvision.models  # noqa: F401  (registers the models)

# sum(p.numel()) of LIONS-EPFL/LION@32a0136 img_classification/lion/models_lion.py::lion_{size}_patch16_224(
# mask_type=...), computed once from the official constructors (README: 5M / 22M / 86M).
OFFICIAL_PARAMS = {
    ("tiny", "Lit"): 5717416, ("tiny", "Decay"): 5717452, ("tiny", "Selective"): 5724364,
    ("small", "Selective"): 22078384, ("base", "Selective"): 86678392,
}


@pytest.mark.parametrize("size,mask", sorted(OFFICIAL_PARAMS))
def test_lion_vit_parameter_counts_match_the_official_models(size, mask):
    with torch.device("meta"):
        model = timm.create_model(f"lion_vit_{size}_patch16_224", mask_type=mask)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[(size, mask)]


def test_lion_vit_classifies_at_a_small_size():
    model = timm.create_model("lion_vit_tiny_patch16_224", img_size=32, num_classes=10, depth=2, mask_type="Decay")
    assert {type(b.attn).__name__ for b in model.blocks} == {"LionAttention"}
    assert model.blocks[0].attn.mask_type == "Decay"
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


# sum(p.numel()) of hustvl/ViG@dfb9d32 classification/models/vig.py::ViG with configs/vig/vig-{t,s,b}.yaml's options,
# computed once from the official constructor (paper: 6M / 23M / 89M); the state dict names and shapes are the same.
VIG_PARAMS = {"tiny": 5846056, "small": 22638184, "base": 89068264}


@pytest.mark.parametrize("size", sorted(VIG_PARAMS))
def test_vig_parameter_counts_match_the_official_models(size):
    with torch.device("meta"):
        model = timm.create_model(f"vig_{size}_patch16_224")
    assert sum(p.numel() for p in model.parameters()) == VIG_PARAMS[size]


def test_vig_runs_at_other_resolutions():
    model = timm.create_model("vig_tiny_patch16_224", img_size=64, num_classes=10, depth=2).eval()
    assert model.blocks[0].attn.use_out_act
    for size in ((64, 64), (80, 48)):
        out = model(torch.randn(1, 3, *size))
        assert out.shape == (1, 10) and torch.isfinite(out).all()

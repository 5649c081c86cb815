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

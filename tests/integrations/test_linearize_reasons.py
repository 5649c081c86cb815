"""linearize() on the timm ViTs it cannot convert: the error says why (RoPE, relative position bias, qk-norm)."""
import pytest
import timm

from linvision.timm import linearize

TINY = dict(pretrained=False, img_size=32, depth=1, num_classes=2, embed_dim=32, num_heads=2)


@pytest.mark.parametrize("name,reason", [
    ("eva02_tiny_patch14_224", "rotary position embedding"),
    ("vit_small_patch16_rope_224", "rotary position embedding"),
    ("beit_base_patch16_224", "relative position bias cannot be carried by a linear mixer"),
])
def test_unsupported_attentions_say_why(name, reason):
    with pytest.raises(TypeError, match=reason):
        linearize(timm.create_model(name, **TINY), "linear")


def test_qk_norm_says_why_and_strict_false_drops_it():
    with pytest.raises(ValueError, match=r"qk_norm=True\) normalises q and k"):
        linearize(timm.create_model("vit_tiny_patch16_224", qk_norm=True, **TINY), "linear")
    with pytest.warns(UserWarning, match="q_norm"):
        linearize(timm.create_model("vit_tiny_patch16_224", qk_norm=True, **TINY), "linear", strict=False)

"""linearize() on the timm ViTs it cannot convert, or not with the chosen mixer: the error says why."""
import pytest
import timm
import torch
from timm.layers import Attention

from linvision.mixers import create_mixer
from linvision.mixers.rotary import Rotation
from linvision.timm import inherit_mixer, linearize

TINY = dict(pretrained=False, img_size=32, depth=1, num_classes=2, embed_dim=32, num_heads=2)
ROPE_MIXERS = "clear, hedgehog, linear, lolcats, softmax"


@pytest.mark.parametrize("name,reason", [
    ("beit_base_patch16_224", "relative position bias cannot be carried by a linear mixer, which never forms"),
    ("vit_relpos_small_patch16_224", "relative position bias cannot be carried by a linear mixer"),
])
def test_relative_position_bias_says_why(name, reason):
    with pytest.raises(TypeError, match=reason):
        linearize(timm.create_model(name, **TINY), "linear")


@pytest.mark.parametrize("name", ["eva02_tiny_patch14_224", "vit_small_patch16_rope_224"])
def test_rope_with_a_mixer_that_cannot_carry_it_names_those_that_can(name):
    with pytest.raises(ValueError, match=rf"mixer 'liger' cannot apply it.*mixers that can: {ROPE_MIXERS}"):
        linearize(timm.create_model(name, **TINY), "liger")
    with pytest.raises(ValueError, match=r"mixer 'lit' cannot apply it"):  # from_softmax mixers too
        linearize(timm.create_model(name, **TINY), "lit")
    with pytest.warns(UserWarning, match="rope"):
        model = linearize(timm.create_model(name, **TINY), "liger", strict=False)
    assert model.blocks[0].attn.rope_half is None and torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_a_mixer_without_rope_support_refuses_a_rotation():
    mixer = create_mixer("liger", 8, 2)
    rot = Rotation.from_timm(torch.zeros(4, 8), half=False)
    with pytest.raises(ValueError, match="LigerAttention does not take a rotary position embedding"):
        with mixer.rotation(rot):
            mixer(torch.randn(1, 4, 8), (2, 2), 0)
    linear = create_mixer("linear", 8, 2)
    with pytest.raises(ValueError, match="RoPE for 4 image tokens of 4 dims; the grid hw=3x3 has 9 tokens"):
        with linear.rotation(rot):
            linear(torch.randn(1, 9, 8), (3, 3), 0)
    assert linear.current_rope is None  # only for the block


def test_qk_norm_says_why_and_strict_false_drops_it():
    model = lambda: timm.create_model("vit_tiny_patch16_224", qk_norm=True, **TINY)  # noqa: E731
    with pytest.raises(ValueError, match=r"qk_norm=True\) normalises q and k.*mixer 'liger'.*mixers that carry them: "
                                         + ROPE_MIXERS):
        linearize(model(), "liger")
    with pytest.warns(UserWarning, match="q_norm"):
        linearize(model(), "liger", strict=False)


def test_eva_parts_without_a_place_in_a_mixer():
    with pytest.raises(ValueError, match="output norm.*scale_attn_inner"):  # EVA-CLIP's sub-norm
        linearize(timm.create_model("eva02_tiny_patch14_224", scale_attn_inner=True, **TINY), "softmax")
    with pytest.raises(ValueError, match="grouped-query attention"):
        linearize(timm.create_model("vit_small_patch16_rope_224", num_kv_heads=1, qkv_fused=False, **TINY), "softmax")
    with pytest.raises(ValueError, match="output gate"):
        inherit_mixer(Attention(32, 2, gated=True), "softmax")

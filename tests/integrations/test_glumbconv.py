"""SANA's Mix-FFN (GLUMBConv): live parity with diffusers' module on the same weights, prefix tokens as 1×1
images, and the ``mlp_layer="glumbconv"`` option of linvision's blocks and timm ViT (a SANA-style linear
ViT: ``mixer="sana"`` + Mix-FFN, trained from scratch with gradients everywhere)."""
import pytest
import timm
import torch
from diffusers.models.transformers.sana_transformer import GLUMBConv as DiffusersGLUMBConv

from linvision.models import MixerBlock
from linvision.models.glumbconv import GLUMBConv
from tests.helpers import rel_err

DIM = 24


def pair(expand=2.5):
    torch.manual_seed(0)
    ref = DiffusersGLUMBConv(DIM, DIM, expand_ratio=expand, norm_type=None, residual_connection=False).eval()
    ours = GLUMBConv(DIM, int(expand * DIM))
    ours.load_state_dict(ref.state_dict())  # diffusers' parameter names
    return ours, ref


def test_matches_diffusers_glumbconv_on_the_grid():
    ours, ref = pair()
    x = torch.randn(2, 7 * 9, DIM)
    with torch.no_grad():
        expected = ref(x.transpose(1, 2).reshape(2, DIM, 7, 9)).flatten(2).transpose(1, 2)
        assert rel_err(ours(x, (7, 9)), expected) < 1e-6


def test_prefix_tokens_are_1x1_images_and_leave_the_grid_alone():
    ours, ref = pair()
    prefix, grid = torch.randn(2, 3, DIM), torch.randn(2, 5 * 4, DIM)
    with torch.no_grad():
        out = ours(torch.cat([prefix, grid], 1), (5, 4), 3)
        alone = ours(grid, (5, 4))
        as_images = ref(prefix.reshape(6, DIM, 1, 1)).reshape(2, 3, DIM)
    assert torch.equal(out[:, 3:], alone)
    assert rel_err(out[:, :3], as_images) < 1e-6


def test_bad_input_raises():
    ours, _ = pair()
    with pytest.raises(ValueError, match="expected x of shape"):
        ours(torch.randn(1, 13, DIM), (3, 4))
    with pytest.raises(ValueError, match="mlp_layer"):
        MixerBlock(DIM, 2, mlp_layer="ffn")


def test_sana_style_vit_trains_at_any_resolution():
    model = timm.create_model("linvit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=DIM, depth=2,
                              num_heads=2, num_classes=5, mixer="sana", mlp_layer="glumbconv", mlp_ratio=2.5,
                              dynamic_img_size=True)
    assert all(isinstance(b.mlp, GLUMBConv) for b in model.blocks)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 56)).shape == (1, 5)  # a 5x7 patch grid never seen

"""Deployment paths: ``torch.export`` with a dynamic batch, timm's FX feature extraction, graph-break-free
adapters under ``torch.compile``."""
import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names

import linvision  # noqa: F401  (registers the linvit models)
from tests.helpers import rel_err

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def linvit(mixer):
    torch.manual_seed(0)
    return timm.create_model("linvit_tiny_patch16_224", mixer=mixer, **TINY).eval()


def test_export_with_a_dynamic_batch_on_the_linear_kernel():
    """The reference kernel's chunk size does not depend on a symbolic batch, so no guard pins B."""
    m = linvit("linear")
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(m, (torch.randn(3, 3, 32, 32),), dynamic_shapes=({0: batch},))
    for b in (1, 5):
        x = torch.randn(b, 3, 32, 32)
        assert rel_err(program.module()(x), m(x)) < 1e-5


@pytest.mark.parametrize("mixer", ["linear", "softmax"])
def test_timm_fx_feature_extraction(mixer):
    """Mixers are opaque FX leaves (registered with timm), the rest of the ViT traces."""
    m = linvit(mixer)
    assert "blocks.1.attn" in get_graph_node_names(m)[1]
    extractor = create_feature_extractor(m, ["blocks.0", "blocks.1", "head"])
    x = torch.randn(2, 3, 32, 32)
    out = extractor(x)
    assert out["blocks.0"].shape == (2, 17, 32)
    assert rel_err(out["head"], m(x)) < 1e-6

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


def test_flux_clear_compiles_without_a_graph_break_given_the_grid():
    """FLUX's grid read from img_ids is a device read (a graph break); given per call, the hook reads nothing."""
    from linvision.diffusers import DiffusersAdapter
    from tests import tiny_diffusers as tiny

    pipe = tiny.build_flux()
    DiffusersAdapter.construct_for(pipe, "clear", radius=2)
    h, w = 3, 4
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    call = dict(hidden_states=torch.randn(1, h * w, pipe.transformer.config.in_channels),
                encoder_hidden_states=torch.randn(1, 6, 32), pooled_projections=torch.randn(1, 32),
                timestep=torch.tensor([0.5]), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(6, 3), return_dict=False)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(pipe.transformer)(**call, joint_attention_kwargs={"linvision_grid": (h, w)})
    assert not [r for r in explained.break_reasons if any("geometry.py" in f.filename for f in r.user_stack)]
    with torch.no_grad():
        given = pipe.transformer(**call, joint_attention_kwargs={"linvision_grid": (h, w)})[0]
        from_ids = pipe.transformer(**call)[0]
    assert torch.equal(given, from_ids)
    torch._dynamo.reset()

"""The timm and diffusers wrappers take the token grid as ints only, like every mixer (no rounding)."""
import pytest
import torch

import linvision
from linvision.diffusers.geometry import LatentGeometry
from linvision.timm import TimmAttention

BAD_HW = [(8.5, 8), (8.0, 8.0), ("8", "8"), "88", (True, 64), (0, 8), (8,)]


@pytest.mark.parametrize("hw", BAD_HW)
def test_timm_attention_refuses_a_non_int_grid(hw):
    with pytest.raises(ValueError, match="hw"):
        TimmAttention(linvision.create_mixer("linear", 32, 4), hw, 0)


def test_timm_attention_takes_int_grids_and_tensors():
    assert TimmAttention(linvision.create_mixer("linear", 32, 4), (torch.tensor(8), 8), 1).hw == (8, 8)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        TimmAttention(linvision.create_mixer("linear", 32, 4), (8, 8), 1.0)


@pytest.mark.parametrize("hw", BAD_HW)
def test_latent_geometry_refuses_a_non_int_grid(hw):
    with pytest.raises(ValueError, match="hw"):
        LatentGeometry("patch", 2).record(hw)


def test_latent_geometry_patch_size_is_an_int():
    for bad in (2.0, 2.5, "2", True, 0):
        with pytest.raises(ValueError, match="patch_size"):
            LatentGeometry("patch", bad)
    g = LatentGeometry("patch", 2)
    g.record((16, 12))
    assert g.token_grid() == (8, 6)

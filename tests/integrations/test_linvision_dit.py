"""linvision's DiT (``linvision.models.dit.LinVisionDiT``): shapes at any grid, adaLN-Zero init, the sin-cos
embedding against diffusers', label dropout, save/load, a SANA-style (sana + GLUMBConv) model that trains, and
clear errors."""
from __future__ import annotations

import pytest
import torch

from linvision.models.dit import LinVisionDiT, sincos_positions
from tests.helpers import one_thread  # noqa: F401  (autouse: tiny models run fastest on one thread)

TINY = dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8)
SANA = dict(mixer="sana", mlp_layer="glumbconv", mlp_ratio=2.5, pos_embed="none")


def _perturbed(model: LinVisionDiT, seed: int = 0) -> LinVisionDiT:
    """The zero-initialised adaLN and output layers get random weights, so the output depends on everything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _call(model, x, t=(1, 500, 999), y=(0, 3, 1000)):
    return model(x, timestep=torch.tensor(t[:len(x)]), class_labels=torch.tensor(y[:len(x)])).sample


@pytest.mark.parametrize("options", [dict(), dict(mixer="lit", mlp_layer="glumbconv"), SANA],
                         ids=["softmax-mlp", "lit-glumbconv", "sana-glumbconv"])
def test_forward_shapes_at_two_resolutions_and_zero_init(options):
    torch.manual_seed(0)
    model = LinVisionDiT(**TINY, **options)
    for hw in ((8, 8), (7, 9)):
        out = _call(model, torch.randn(3, 4, *hw))
        assert out.shape == (3, 8, *hw)
        assert torch.count_nonzero(out) == 0  # adaLN-Zero: the output projection starts at 0
    _perturbed(model)
    for hw in ((8, 8), (7, 9)):
        out = _call(model, torch.randn(3, 4, *hw))
        assert out.shape == (3, 8, *hw) and torch.isfinite(out).all() and out.abs().amax() > 0


def test_patch_two_and_scalar_timestep():
    model = _perturbed(LinVisionDiT(**{**TINY, "patch_size": 2, "sample_size": 12}, mixer="sana", learn_sigma=False))
    x = torch.randn(2, 4, 12, 6)
    out = model(x, timestep=7, class_labels=torch.tensor([1, 2])).sample
    assert out.shape == (2, 4, 12, 6)
    torch.testing.assert_close(out, model(x, timestep=torch.tensor([7, 7]), class_labels=torch.tensor([1, 2])).sample)


@pytest.mark.parametrize("grid", [(8, 8), (16, 16), (6, 10)])
def test_sincos_positions_match_diffusers(grid):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(32, grid, base_size=8, interpolation_scale=1.0, output_type="pt")
    torch.testing.assert_close(sincos_positions(32, grid, 8), ref.float(), rtol=1e-5, atol=1e-5)


def test_label_dropout_gives_the_null_class_in_training():
    model = _perturbed(LinVisionDiT(**TINY, class_dropout_prob=0.5))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 20])
    null = model(x, timestep=t, class_labels=torch.tensor([1000, 1000])).sample
    cond = model(x, timestep=t, class_labels=torch.tensor([3, 4])).sample
    assert not torch.allclose(null, cond)
    model.train()
    model.class_dropout_prob = 1.0  # every label dropped (the constructor allows < 1 only)
    with torch.no_grad():
        torch.testing.assert_close(model(x, timestep=t, class_labels=torch.tensor([3, 4])).sample, null)


def test_save_load_round_trip(tmp_path):
    model = _perturbed(LinVisionDiT(**TINY, **SANA, mixer_kwargs={"qk_norm": True}))
    model.save_pretrained(tmp_path / "dit")
    loaded = LinVisionDiT.from_pretrained(tmp_path / "dit").eval()
    assert loaded.config.mixer == "sana" and loaded.config.mixer_kwargs == {"qk_norm": True}
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(3, 4, 7, 9)
    assert torch.equal(_call(model, x), _call(loaded, x))


def test_sana_glumbconv_dit_trains_on_a_tiny_batch():
    """ε-prediction MSE on one fixed random batch: AdamW lowers it within a few steps."""
    torch.manual_seed(0)
    model = LinVisionDiT(**TINY, **SANA).train()
    x, noise = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    t, y = torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(model(x + noise, timestep=t, class_labels=y).sample[:, :4], noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.85 * losses[0], losses
    assert model.blocks[0].mlp.conv_depth.weight.grad.abs().amax() > 0  # the Mix-FFN's conv is trained


@pytest.mark.parametrize("kwargs, match", [
    (dict(mixer="nope"), "mixer"),
    (dict(mlp_layer="swiglu"), "mlp_layer"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(mixer_kwargs=[1]), "mixer_kwargs"),
    (dict(pos_embed="rope"), "pos_embed"),
    (dict(patch_size=0), "patch_size"),
    (dict(patch_size=3), "multiple of patch_size"),
    (dict(class_dropout_prob=1.0), "class_dropout_prob"),
    (dict(learn_sigma=1), "learn_sigma"),
    (dict(attention_head_dim=3, num_attention_heads=1), "divisible by 4"),
    (dict(mixer="sana", mixer_kwargs={"eps": -1.0}), "eps"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinVisionDiT(**{**TINY, **kwargs})


def test_bad_calls_are_clear_errors():
    model = LinVisionDiT(**{**TINY, "patch_size": 2})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        _call(model, torch.randn(1, 4, 8, 7))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        _call(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(2, 4, 8, 8), timestep=1, class_labels=torch.tensor([0, 1001]))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(2, 4, 8, 8), timestep=1, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="timestep"):
        model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 2, 3]), class_labels=torch.tensor([0, 1]))


def test_adapter_refuses_it_clearly():
    from linvision.diffusers import DiffusersAdapter

    with pytest.raises(ValueError, match="no attention to replace"):
        DiffusersAdapter.construct_for(LinVisionDiT(**TINY), "lit")

"""timm integration: the linvit models (any mixer, hybrids, timm contract) and linearize() of a timm ViT."""
import copy
import importlib.util
import warnings
from types import MappingProxyType

import pytest
import timm
import torch
from torch import nn

import linvision
import linvision.mixers as registry
import linvision.models.vit as vit_module
from linvision.mixers import TokenMixer
from linvision.models import LinVisionTransformer
from linvision.timm import TimmAttention, linearize

MIXERS = linvision.list_mixers()
# Tiny: 32x32 images, 8x8 patches (a 4x4 grid), 32 channels, 2 heads, 2 blocks.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)


def linvit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("linvit_tiny_patch16_224", **{**TINY, **kwargs})


def timm_vit(**kwargs):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, depth=2, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kwargs}).eval()


def images(h=32, w=32, b=2):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1))


# --- registration and the timm model contract ---------------------------------------------------------


def test_registered_with_default_cfgs():
    names = {"linvit_tiny_patch16_224", "linvit_small_patch16_224", "linvit_base_patch16_224"}
    assert names <= set(timm.list_models("linvit*"))
    m = linvit(depth=1)
    cfg = m.pretrained_cfg
    assert cfg["url"] == "" and cfg["hf_hub_id"] == "" and cfg["num_classes"] == 1000
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] and cfg["std"]
    keys = m.state_dict()
    assert cfg["first_conv"] + ".weight" in keys and cfg["classifier"] + ".weight" in keys
    assert m.num_features == m.head_hidden_size == 32 and m.num_prefix_tokens == 1
    assert m.no_weight_decay() == {"pos_embed", "cls_token", "reg_token"}
    assert set(m.group_matcher()) == {"stem", "blocks"}


def test_variant_dims():
    for name, (dim, heads) in {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}.items():
        m = timm.create_model(f"linvit_{name}_patch16_224", depth=1, img_size=32)  # depth only: fast
        assert m.embed_dim == dim and m.blocks[0].attn.num_heads == heads


@pytest.mark.parametrize("name", MIXERS)
def test_every_mixer_forward_backward(name):
    m = linvit(mixer=name, reg_tokens=1)
    assert all(type(b.attn) is linvision.mixer_class(name) for b in m.blocks)
    x = images().requires_grad_()
    y = m(x)
    assert y.shape == (2, 3) and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_per_layer_hybrid_list():
    m = linvit(depth=4, mixer=["linear", "softmax"], mixer_kwargs={"linear": {"feature_map": "relu"}})
    assert m.mixers == ("linear", "softmax", "linear", "softmax")
    assert [b.attn.feature_map for b in m.blocks[::2]] == ["relu", "relu"]
    assert all(type(b.attn).__name__ == "SoftmaxAttention" for b in m.blocks[1::2])
    assert m(images()).shape == (2, 3)
    assert linvit(depth=4, mixer="linear,linear,linear,softmax").mixers == ("linear",) * 3 + ("softmax",)
    explicit = ["linear", "softmax", "softmax", "linear"]
    assert linvit(depth=4, mixer=explicit).mixers == tuple(explicit)


def test_bad_mixer_specs_raise_value_error():
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        linvit(mixer="nope")
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        linvit(mixer=["linear", "nope"])
    with pytest.raises(ValueError, match="divide"):
        linvit(depth=3, mixer=["linear", "softmax"])
    with pytest.raises(ValueError, match="unknown option"):
        linvit(mixer="linear", mixer_kwargs={"not_an_option": 1})
    with pytest.raises(ValueError, match="unknown option"):  # a shared key goes to every layer, softmax too
        linvit(mixer=["linear", "softmax"], mixer_kwargs={"feature_map": "relu"})


def test_features_only_shapes():
    m = linvit(features_only=True, out_indices=(0, 1), depth=3).eval()
    assert len(m.model.blocks) == 2  # pruned after the last index
    assert m.feature_info.channels() == [32, 32] and m.feature_info.reduction() == [8, 8]
    feats = m(images())
    assert [f.shape for f in feats] == [(2, 32, 4, 4)] * 2
    d = linvit(features_only=True, out_indices=(-1,), dynamic_img_size=True, mixer="lit").eval()
    assert [f.shape for f in d(images(48, 32))] == [(2, 32, 6, 4)]


def test_forward_intermediates_match_forward_features():
    m = linvit(mixer="lit", reg_tokens=2).eval()
    x = images()
    final, inter = m.forward_intermediates(x, indices=2, output_fmt="NLC", return_prefix_tokens=True)
    torch.testing.assert_close(final, m.forward_features(x))
    (last, prefix), = inter[-1:]
    assert last.shape == (2, 16, 32) and prefix.shape == (2, 3, 32)


def test_dynamic_img_size_at_unseen_resolution():
    m = linvit(mixer="lit", dynamic_img_size=True, reg_tokens=1).eval()
    x = images(48, 32)
    assert m.forward_features(x).shape == (2, 2 + 6 * 4, 32)
    assert m(x).shape == (2, 3)
    fixed = linvit(mixer="lit", reg_tokens=1).eval()  # same seed, same weights
    torch.testing.assert_close(fixed(images()), m(images()), rtol=0, atol=0)
    with pytest.raises(AssertionError):  # timm's PatchEmbed: a fixed-size model rejects other sizes
        fixed(x)


def test_set_input_size_resamples_pos_embed():
    m = linvit(mixer="linear").eval()
    m.set_input_size(img_size=(48, 32))
    assert m.pos_embed.shape == (1, 1 + 6 * 4, 32)
    assert m(images(48, 32)).shape == (2, 3)


def test_reset_classifier_and_pooling():
    m = linvit(mixer="linear").eval()
    x = images()
    m.reset_classifier(7)
    assert m.get_classifier().out_features == 7 and m(x).shape == (2, 7)
    m.reset_classifier(0)
    assert isinstance(m.get_classifier(), nn.Identity)
    assert m(x).shape == (2, 32)
    torch.testing.assert_close(m(x), m.forward_features(x)[:, 0])
    m.reset_classifier(4, global_pool="avg")
    assert m.global_pool == "avg" and m(x).shape == (2, 4)
    assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 32)
    with pytest.raises(ValueError):
        linvit(class_token=False, global_pool="token")


def test_grad_checkpointing_same_output_and_gradients(monkeypatch):
    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(args[1])  # the grid passed to the block
        return torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(vit_module, "checkpoint", counting)
    results = []
    for enable in (False, True):
        m = linvit(mixer=["lit", "linear"], dynamic_img_size=True)
        m.set_grad_checkpointing(enable)
        x = images(48, 32).requires_grad_()
        m(x).square().sum().backward()
        results.append((m(x).detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}))
    assert calls == [(6, 4)] * 4  # two blocks, two forwards, only with checkpointing on
    (y0, gx0, g0), (y1, gx1, g1) = results
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(gx1, gx0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], msg=n)


def test_save_for_hf_and_reload_from_local_dir(tmp_path):
    args = dict(TINY, depth=4, mixer=["lit", "softmax"], mixer_kwargs={"lit": {"dwc_kernel_size": 3}}, reg_tokens=1)
    m = linvit(**args).eval()
    # timm >= 1.0.31 records the constructor arguments itself (timm.models._input); older timm is given them
    records_args = importlib.util.find_spec("timm.models._input") is not None
    timm.models.save_for_hf(m, tmp_path, safe_serialization=True, **({} if records_args else {"model_args": args}))
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    torch.manual_seed(123)  # a different init: equality must come from the loaded weights
    r = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert isinstance(r, LinVisionTransformer) and r.mixers == m.mixers
    assert r.blocks[0].attn.dwc_kernel_size == 3
    x = images()
    assert torch.equal(r(x), m(x))


def test_timm_vit_checkpoint_loads_into_softmax_linvit(tmp_path):
    """Same parameter names as timm's ViT: its weights load (strict) and give the same outputs."""
    ref = timm_vit(reg_tokens=1)
    path = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), path)
    m = timm.create_model(
        "linvit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=5),
        img_size=32, depth=2, num_classes=5, reg_tokens=1,
    ).eval()
    assert torch.equal(m(images()), ref(images()))


# --- linearize() on a timm ViT ------------------------------------------------------------------------


def test_linearize_softmax_round_trip_is_exact():
    ref = timm_vit()
    x = images()
    assert torch.equal(linearize(copy.deepcopy(ref), "softmax")(x), ref(x))
    dyn = timm_vit(dynamic_img_size=True, reg_tokens=2)
    lin = linearize(copy.deepcopy(dyn), "softmax")
    x = images(48, 32)
    assert torch.equal(lin(x), dyn(x))
    assert all(b.attn.hw == (3, 2) and b.attn.num_prefix_tokens == 3 for b in lin.blocks)


def test_linearize_linear_copies_weights_and_keeps_the_rest():
    ref = timm_vit()
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    lin = linearize(ref, "linear", feature_map="relu")
    assert all(isinstance(b.attn, TimmAttention) for b in lin.blocks)
    after = lin.state_dict()
    for k, v in before.items():
        if ".attn." in k:  # blocks.i.attn.qkv.weight → blocks.i.attn.mixer.qkv.weight
            assert torch.equal(after[k.replace(".attn.", ".attn.mixer.")], v), k
        else:
            assert torch.equal(after[k], v), k
    assert lin.blocks[0].attn.mixer.feature_map == "relu"
    for x in (images(), images(b=1)):
        y = lin(x)
        assert y.shape == (x.shape[0], 5) and torch.isfinite(y).all()
    assert lin.forward_features(images()).shape == (2, 5, 192)


@pytest.mark.parametrize("name", MIXERS)
def test_linearize_every_mixer_keeps_shapes(name):
    ref = timm_vit(dynamic_img_size=True, reg_tokens=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mixers with other parameter names warn what they could not inherit
        lin = linearize(ref, name, strict=False)
    assert lin(images(48, 32)).shape == (2, 5)
    # forward_intermediates bypasses model.forward: the grid still comes from this input
    feats = lin.forward_intermediates(images(32, 64), indices=1, intermediates_only=True)
    assert [f.shape for f in feats] == [(2, 192, 2, 4)]


def test_linearize_hybrid_and_per_mechanism_options():
    lin = linearize(timm_vit(depth=4), ["linear", "softmax"], linear={"feature_map": "relu"})
    kinds = [type(b.attn.mixer).__name__ for b in lin.blocks]
    assert kinds == ["LinearAttention", "SoftmaxAttention"] * 2
    assert lin.blocks[0].attn.mixer.feature_map == "relu"


class RenamedAttention(TokenMixer):
    """A test mixer whose projections have other names and no from_softmax: nothing can be inherited."""

    def __init__(self, dim, num_heads=8):
        super().__init__(dim, num_heads)
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def mix(self, x, hw, num_prefix_tokens):
        return self.out(self.to_qkv(x)[..., : self.dim])


def test_linearize_reports_what_it_cannot_inherit(monkeypatch):
    monkeypatch.setattr(registry, "MIXERS", MappingProxyType({**registry.MIXERS, "renamed": RenamedAttention}))
    ref = timm_vit()
    before = copy.deepcopy(ref.state_dict())
    with pytest.raises(ValueError, match=r"cannot inherit .*qkv\.weight.*proj\.weight"):
        linearize(ref, "renamed")
    assert all(type(b.attn).__name__ == "Attention" for b in ref.blocks)  # left unchanged on error
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())
    with pytest.warns(UserWarning, match="cannot inherit"):
        lin = linearize(ref, "renamed", strict=False)
    assert lin(images()).shape == (2, 5)
    with pytest.raises(ValueError, match="q_norm"):  # q/k norms have no counterpart in this mixer
        linearize(timm_vit(qk_norm=True), "liger")


def test_linearize_errors():
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        linearize(timm_vit(), "nope")
    with pytest.raises(ValueError, match="unknown option"):
        linearize(timm_vit(), "linear", not_an_option=1)
    with pytest.raises(TypeError, match="VisionTransformer"):
        linearize(nn.Linear(2, 2), "linear")
    with pytest.raises(TypeError, match="timm.layers.Attention"):
        linearize(linvit(), "linear")  # already a linvision model
    lin = linearize(timm_vit(), "linear")
    with pytest.raises(ValueError, match="attn_mask"):
        lin.blocks[0].attn(torch.randn(1, 5, 192), attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_linearized_copy_tracks_its_own_grid():
    """The grid hook follows copy.deepcopy (e.g. a model EMA): each copy sees its own inputs."""
    lin = linearize(timm_vit(dynamic_img_size=True), "lit")
    ema = copy.deepcopy(lin)
    lin(images(48, 32))
    ema(images(32, 64))
    assert lin.blocks[1].attn.hw == (3, 2) and ema.blocks[1].attn.hw == (2, 4)

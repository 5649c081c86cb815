"""diffusers adapters: install/uninstall exactness, every mechanism × denoiser at two resolutions,
save/load, per-call geometry, untouched cross-attention, clear errors.

Tiny random-weight pipelines (``tests/tiny_diffusers.py``) are saved to a temp folder and loaded back
offline; every run is 2 steps on CPU.
"""
import pytest
import torch

from linvision.diffusers import DiffusersAdapter, LatentGeometry
from linvision.diffusers.self_attention import SelfAttentionShell
from linvision.mixers import list_mixers
from tests import tiny_diffusers as tiny

SELF_FAMILIES = ("unet", "dit", "pixart")
JOINT_FAMILIES = ("sd3", "flux")
PAPER_MECHANISMS = ("linfusion", "lit", "clear", "lina", "dydila")
JOINT_MECHANISMS = ("clear", "lit", "linfusion")
SMALL = {"clear": {"radius": 2}}  # a window smaller than the grids, so locality is exercised


def unseen(family):
    """A resolution never used before: non-square where the denoiser allows it (DiT: square only)."""
    return (48, 48) if family == "dit" else (48, 32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    out = {}
    for family in tiny.FAMILIES:
        out[family] = str(root / family)
        tiny.BUILDERS[family]().save_pretrained(out[family])
    return out


def images(pipe, family, size=None, seed=0):
    h, w = size or (tiny.TRAIN_SIZE[family],) * 2
    with torch.no_grad():
        return tiny.run(pipe, family, h, w, seed=seed)


def randomize(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


CASES = [(f, m) for f in SELF_FAMILIES for m in PAPER_MECHANISMS] + [(f, m) for f in JOINT_FAMILIES for m in JOINT_MECHANISMS]


@pytest.mark.parametrize("family,mechanism", CASES)
def test_adapter_runs_two_resolutions_and_uninstalls_exactly(folders, family, mechanism):
    pipe = tiny.load(folders[family])
    denoiser = pipe.unet if family == "unet" else pipe.transformer
    reference = images(pipe, family)
    state_before = {k: v.clone() for k, v in denoiser.state_dict().items()}
    adapter = DiffusersAdapter.construct_for(pipe, mechanism, **SMALL.get(mechanism, {}))
    assert adapter.installed and adapter.config.family == family
    seen = images(pipe, family)
    assert torch.isfinite(seen).all() and seen.shape == reference.shape
    h, w = unseen(family)
    other = images(pipe, family, (h, w))
    assert other.shape[-2:] == (h, w) and torch.isfinite(other).all()
    assert not torch.equal(seen, reference)  # the adapter is really in the loop
    adapter.uninstall()
    assert not adapter.installed
    assert torch.equal(images(pipe, family), reference)
    after = denoiser.state_dict()
    assert after.keys() == state_before.keys() and all(torch.equal(after[k], state_before[k]) for k in after)


@pytest.mark.parametrize("family", SELF_FAMILIES + JOINT_FAMILIES)
def test_teacher_equivalent_adapter_reproduces_the_teacher(folders, family):
    """Softmax mixer with inherited weights (self families) or CLEAR with a window covering the whole
    grid (joint families) is the teacher's attention: the wiring (projections, text order, norms, RoPE,
    output split) is exact up to rounding."""
    pipe = tiny.load(folders[family])
    reference = images(pipe, family, unseen(family))
    if family in SELF_FAMILIES:
        DiffusersAdapter.construct_for(pipe, "softmax")
    else:
        DiffusersAdapter.construct_for(pipe, "clear", radius=1000, inherit="qkv+proj")
    out = images(pipe, family, unseen(family))
    torch.testing.assert_close(out, reference, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family,mechanism", [("unet", "linfusion"), ("dit", "lit"), ("pixart", "lina"),
                                              ("sd3", "lit"), ("flux", "clear")])
def test_save_load_round_trip_gives_identical_images(folders, family, mechanism, tmp_path):
    pipe = tiny.load(folders[family])
    options = {"radius": 2, "pool_factor": 2} if mechanism == "clear" else {}
    adapter = DiffusersAdapter.construct_for(pipe, mechanism, **options)
    randomize(adapter)
    first = images(pipe, family, unseen(family))
    adapter.save_pretrained(tmp_path / "adapter")
    adapter.uninstall()
    fresh = tiny.load(folders[family])
    loaded = DiffusersAdapter.from_pretrained(str(tmp_path / "adapter")).install(fresh)
    assert loaded.config.mechanism == mechanism and loaded.config.mixer_options == options
    assert torch.equal(images(fresh, family, unseen(family)), first)


def test_adapter_holds_only_new_weights_and_keeps_cross_attention(folders):
    pipe = tiny.load(folders["unet"])
    unet = pipe.unet
    attn2 = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    processors = dict(unet.attn_processors)
    adapter = DiffusersAdapter.construct_for(pipe, "linfusion")
    names = [e["module_name"] for e in adapter.config.modules_list]
    assert names and all(n.endswith("attn1") for n in names)
    assert all(k.split(".")[0].isdigit() for k in adapter.state_dict())  # LinFusion's child-index layout
    assert {n: m for n, m in unet.named_modules() if n.endswith("attn2")} == attn2
    # Only the attn2 processors remain visible to diffusers; replacing them all (as IP-Adapter loading
    # does) keeps the adapter in place.
    remaining = unet.attn_processors
    assert set(remaining) == {k for k in processors if "attn2" in k}
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor({k: AttnProcessor() for k in remaining})
    assert all(isinstance(unet.get_submodule(n), SelfAttentionShell) for n in names)


def test_resolution_comes_from_each_call(folders):
    pipe = tiny.load(folders["unet"])
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    first = images(pipe, "unet", (32, 32))
    images(pipe, "unet", (48, 32))
    assert adapter.geometry.latent_hw == (24, 16)
    assert torch.equal(images(pipe, "unet", (32, 32)), first)
    # odd latent sizes: UNet levels are ceil-halved
    g = LatentGeometry("halving")
    g.record((10, 6))
    assert g.grid_for(60) == (10, 6) and g.grid_for(15) == (5, 3) and g.grid_for(6) == (3, 2)
    with pytest.raises(ValueError, match="matches no level"):
        g.grid_for(7)


def test_geometry_errors_are_clear():
    g = LatentGeometry("patch", patch_size=2)
    with pytest.raises(RuntimeError, match="before its denoiser"):
        g.token_grid()
    with pytest.raises(ValueError, match="unknown geometry rule"):
        LatentGeometry("diagonal")


def test_every_registered_mixer_fits_or_says_why(folders):
    """Every registered mixer either runs inside DiT or raises a ValueError naming the problem."""
    pipe = tiny.load(folders["dit"])
    ran = []
    for name in list_mixers():
        try:
            adapter = DiffusersAdapter.construct_for(pipe, name)
        except ValueError as err:
            assert str(err)
            continue
        out = images(pipe, "dit", (16, 16))
        assert torch.isfinite(out).all(), name
        adapter.uninstall()
        ran.append(name)
    assert set(PAPER_MECHANISMS) <= set(ran)


def test_clear_errors(folders, tmp_path):
    pipe = tiny.load(folders["dit"])
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        DiffusersAdapter.construct_for(pipe, "nope")
    with pytest.raises(ValueError, match="unknown option"):
        DiffusersAdapter.construct_for(pipe, "lit", radius=3)
    with pytest.raises(ValueError, match="does not fit a joint"):
        DiffusersAdapter.construct_for(tiny.load(folders["flux"]), "lina")
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    with pytest.raises(RuntimeError, match="already installed"):
        adapter.install(pipe)
    with pytest.raises(ValueError, match="already runs a linvision adapter"):
        DiffusersAdapter.construct_for(pipe, "lit")
    adapter.uninstall()
    with pytest.raises(RuntimeError, match="not installed"):
        adapter.uninstall()
    with pytest.raises(ValueError, match="built for a dit denoiser"):
        adapter.install(tiny.load(folders["pixart"]))
    # a checkpoint from a differently sized denoiser
    from linvision.diffusers.families.dit import dit_transformer

    other = dit_transformer(attention_head_dim=4)
    wrong = DiffusersAdapter.construct_for(other, "lit", install=False)
    with pytest.raises(ValueError, match="does not match this denoiser"):
        wrong.install(pipe)
    # a weights file that does not fit its config
    adapter.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "a" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["0.qkv.weight"] = torch.zeros(3, 3)
    save_file(state, path)
    with pytest.raises(Exception, match="(?i)size|shape"):
        DiffusersAdapter.from_pretrained(str(tmp_path / "a"))


def test_denoiser_step_memory_grows_linearly_with_an_adapter():
    from linvision.benchmarks.denoiser_memory import denoiser_step_memory

    rows = denoiser_step_memory("dit", sizes=(16, 32), adapters=["lit"], width=32, depth=1, heads=2, sdpa="math")
    peak = {(r["variant"], r["size"]): r["peak_mib"] for r in rows}
    assert peak[("lit", 32)] <= 5 * peak[("lit", 16)]
    assert peak[("softmax", 32)] / peak[("softmax", 16)] > peak[("lit", 32)] / peak[("lit", 16)]


def test_per_call_grid_kwarg(folders):
    """``linvision_grid`` in cross/joint attention kwargs gives the grid for one call, hook or not."""
    from diffusers.models.attention_processor import Attention

    pipe = tiny.load(folders["dit"])
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    shell = pipe.transformer.transformer_blocks[0].attn1
    x = torch.randn(1, 12, shell.mixer.dim)
    with pytest.raises(RuntimeError, match="before its denoiser"):
        shell(x)
    torch.testing.assert_close(shell(x, linvision_grid=(3, 4)), shell.mixer(x, (3, 4)))
    adapter.uninstall()
    flux = tiny.load(folders["flux"]).transformer
    adapter = DiffusersAdapter.construct_for(flux, "lit")
    attn = flux.single_transformer_blocks[0].attn
    x = torch.randn(1, 5 + 12, attn.to_q.in_features)
    assert attn(x, linvision_grid=(3, 4)).shape == x.shape
    with pytest.raises(ValueError, match="not 4x4 image tokens plus text"):
        attn(torch.randn(1, 12, attn.to_q.in_features), linvision_grid=(4, 4))
    assert not isinstance(attn, Attention)


def test_unknown_call_kwargs_are_refused_not_dropped(folders):
    """A replaced self-attention and the joint processors take only the keys they use (plus those diffusers
    routes past them: LoRA ``scale``, IP-Adapter masks); anything else is a ValueError, not a silent no-op."""
    pipe = tiny.load(folders["dit"])
    DiffusersAdapter.construct_for(pipe, "lit")
    shell = pipe.transformer.transformer_blocks[0].attn1
    x = torch.randn(1, 12, shell.mixer.dim)
    torch.testing.assert_close(shell(x, linvision_grid=(3, 4), scale=1.0), shell.mixer(x, (3, 4)))
    with pytest.raises(ValueError, match=r"cross_attention_kwargs \['linvision_gird'\] are not taken"):
        shell(x, linvision_gird=(3, 4))
    flux = tiny.load(folders["flux"]).transformer
    DiffusersAdapter.construct_for(flux, "clear", radius=2)
    attn = flux.single_transformer_blocks[0].attn
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        attn.processor(attn, torch.randn(1, 5 + 12, attn.to_q.in_features), linvision_grid=(3, 4), bogus=1)

"""Converters: LinFusion (dict and early list ``modules_list``) and CLEAR checkpoints, written in the tests
from the documented layouts, load into adapters that equal the modules loaded directly; mismatches are
reported key by key."""
import json

import pytest
import torch
from safetensors.torch import save_file

from linvision.diffusers import DiffusersAdapter, load_clear, load_linfusion
from linvision.mixers.linfusion import LinFusionAttention
from tests import tiny_diffusers as tiny


def linfusion_folder(folder, unet, form="dict", mid=None, seed=0):
    """A LinFusion checkpoint for ``unet``'s attn1 modules, in the layout of spec linfusion.md."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    entries, state = [], {}
    targets = [(n, m) for n, m in unet.named_modules() if n.endswith("attn1")]
    for i, (name, attn) in enumerate(targets):
        c, heads = attn.to_q.in_features, attn.heads
        m = c if mid is None else mid
        entries.append({"module_name": name, "dim_n": c, "heads": heads, "projection_mid_dim": mid}
                       if form == "dict" else [name, c, heads])
        shapes = {"to_q.weight": (c, c), "to_k.weight": (c, c), "to_v.weight": (c, c),
                  "to_out.0.weight": (c, c), "to_out.0.bias": (c,)}
        for mlp in ("to_q_", "to_k_"):
            shapes.update({f"{mlp}.0.weight": (m, c), f"{mlp}.0.bias": (m,), f"{mlp}.1.weight": (m,),
                           f"{mlp}.1.bias": (m,), f"{mlp}.3.weight": (c, m), f"{mlp}.3.bias": (c,)})
        for key, shape in shapes.items():
            state[f"{i}.{key}"] = torch.randn(shape, generator=g) * 0.3
    config = {"_class_name": "LinFusion" if form == "dict" else "StableMamba", "_diffusers_version": "0.30.0",
              "modules_list": entries}
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return state, entries


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "pipe"
    tiny.build_sd().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("form,mid", [("dict", None), ("dict", 4), ("list", None)])
def test_linfusion_checkpoint_loads_and_equals_direct_modules(sd_folder, tmp_path, form, mid):
    pipe = tiny.load(sd_folder)
    state, entries = linfusion_folder(tmp_path / "lf", pipe.unet, form, mid)
    adapter = DiffusersAdapter.from_pretrained(str(tmp_path / "lf"))  # auto-detects the LinFusion format
    assert adapter.config.mechanism == "linfusion" and len(adapter.layers()) == len(entries)
    for i, layer in enumerate(adapter.layers()):
        c = layer.dim
        direct = LinFusionAttention(c, layer.num_heads, projection_mid_dim=mid, qkv_bias=False)
        direct.load_state_dict({k[len(f"{i}."):]: v for k, v in state.items() if k.startswith(f"{i}.")})
        x = torch.randn(2, 12, c)
        torch.testing.assert_close(layer(x, (3, 4)), direct(x, (3, 4)), atol=0, rtol=0)
    reference = tiny.run(pipe, "unet", 32, 32)
    adapter.install(pipe)
    for size in ((32, 32), (48, 32)):
        out = tiny.run(pipe, "unet", *size)
        assert torch.isfinite(out).all() and out.shape[-2:] == size
    adapter.uninstall()
    assert torch.equal(tiny.run(pipe, "unet", 32, 32), reference)


def test_linfusion_mismatches_are_reported(sd_folder, tmp_path):
    unet = tiny.load(sd_folder).unet
    state, _ = linfusion_folder(tmp_path / "lf", unet)
    path = tmp_path / "lf" / "diffusion_pytorch_model.safetensors"
    for edit, message in (
        (lambda s: s.pop("0.to_q_.1.weight"), "1 missing: 0.to_q_.1.weight"),
        (lambda s: s.__setitem__("0.to_q_.2.weight", torch.zeros(1)), "1 unexpected: 0.to_q_.2.weight"),
        (lambda s: s.__setitem__("1.to_v.weight", torch.zeros(3, 3)), "mis-shaped: 1.to_v.weight"),
    ):
        broken = dict(state)
        edit(broken)
        save_file(broken, path)
        with pytest.raises(ValueError, match=message):
            load_linfusion(str(tmp_path / "lf"))
    save_file(state, path)
    (tmp_path / "lf" / "config.json").write_text(json.dumps({"_class_name": "Other", "modules_list": []}))
    with pytest.raises(ValueError, match="not a LinFusion checkpoint"):
        load_linfusion(str(tmp_path / "lf"))


def clear_file(path, transformer, pool=None, seed=0):
    """A CLEAR-style state dict for a FLUX transformer (spec clear.md): image-stream projections of every
    block, plus ``…attn.processor.spatial_weight`` for a down-sampled variant."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, attn in transformer.named_modules():
        if not isinstance(attn, FluxAttention):
            continue
        subs = ["to_q", "to_k", "to_v"] + (["to_out.0"] if hasattr(attn, "to_out") else [])
        for sub in subs:
            for pname, p in attn.get_submodule(sub).named_parameters():
                state[f"{name}.{sub}.{pname}"] = torch.randn(p.shape, generator=g) * 0.2
        if pool:
            state[f"{name}.processor.spatial_weight"] = torch.rand((1, 1, 1, pool, 1, pool, 1), generator=g)
    save_file(state, path)
    return state


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    tiny.build_flux().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("filename,radius,pool", [("clear_local_3.safetensors", 3, None),
                                                  ("clear_local_2_down_2.safetensors", 2, 2)])
def test_clear_checkpoint_equals_the_official_loading(flux_folder, tmp_path, filename, radius, pool):
    path = tmp_path / filename
    pipe = tiny.load(flux_folder)
    state = clear_file(path, pipe.transformer, pool)
    adapter = load_clear(str(path), pipe, install=True)
    assert adapter.config.mixer_options == {"radius": radius, "pool_factor": pool}
    installed = pipe.transformer.state_dict()
    assert all(torch.equal(installed[k], v) for k, v in state.items())  # CLEAR's key layout, as installed
    out = tiny.run(pipe, "flux", 32, 48)
    # The official way: processors set, then transformer.load_state_dict(sd, strict=False).
    ref = tiny.load(flux_folder)
    DiffusersAdapter.construct_for(ref, "clear", radius=radius, pool_factor=pool)
    result = ref.transformer.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert torch.equal(tiny.run(ref, "flux", 32, 48), out)


def test_clear_mismatches_are_reported(flux_folder, tmp_path):
    pipe = tiny.load(flux_folder)
    state = clear_file(tmp_path / "clear_local_4.safetensors", pipe.transformer)
    save_file({**state, "transformer_blocks.0.attn.add_q_proj.weight": torch.zeros(2)}, tmp_path / "clear_local_4.safetensors")
    with pytest.raises(ValueError, match=r"unexpected: 0.add_q_proj.weight \(transformer_blocks.0.attn.add_q_proj"):
        load_clear(str(tmp_path / "clear_local_4.safetensors"), pipe)
    save_file({**state, "time_text_embed.linear.weight": torch.zeros(2)}, tmp_path / "clear_local_4.safetensors")
    with pytest.raises(ValueError, match="outside the replaced attentions.*time_text_embed"):
        load_clear(str(tmp_path / "clear_local_4.safetensors"), pipe)
    save_file(state, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="pass radius="):
        load_clear(str(tmp_path / "weights.safetensors"), pipe)
    assert load_clear(str(tmp_path / "weights.safetensors"), pipe, radius=4).config.mixer_options["radius"] == 4
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        load_clear(str(tmp_path / "weights.safetensors"), pipe, radius=4, pool_factor=2)
    partial = {k: v for k, v in state.items() if not k.startswith("single_")}
    save_file(partial, tmp_path / "clear_local_5.safetensors")
    with pytest.raises(ValueError, match="missing: 1.to_k.bias"):
        load_clear(str(tmp_path / "clear_local_5.safetensors"), pipe)
    assert load_clear(str(tmp_path / "clear_local_5.safetensors"), pipe, strict=False) is not None


def test_clear_settings_come_from_the_tensors(flux_folder, tmp_path):
    """Pool factor from the spatial_weight tensors (1 = off, as elsewhere), radius from the argument, the file's
    metadata or a published name; a published name that disagrees with the tensors is refused."""
    pipe = tiny.load(flux_folder)
    state = clear_file(tmp_path / "weights.safetensors", pipe.transformer)
    for off in (1, None):
        adapter = load_clear(str(tmp_path / "weights.safetensors"), pipe, radius=3, pool_factor=off)
        assert adapter.config.mixer_options == {"radius": 3, "pool_factor": None}
    clear_file(tmp_path / "renamed.safetensors", pipe.transformer, pool=2)
    assert load_clear(str(tmp_path / "renamed.safetensors"), pipe, radius=2).config.mixer_options["pool_factor"] == 2
    with pytest.raises(ValueError, match="pool_factor 1 does not match the checkpoint .spatial_weight for f=2"):
        load_clear(str(tmp_path / "renamed.safetensors"), pipe, radius=2, pool_factor=1)
    save_file(state, tmp_path / "tagged.safetensors", metadata={"radius": "5"})
    assert load_clear(str(tmp_path / "tagged.safetensors"), pipe).config.mixer_options["radius"] == 5
    save_file(state, tmp_path / "clear_local_2_down_2.safetensors")  # the name says pooled, the tensors do not
    with pytest.raises(ValueError, match="file name says pool factor 2, the tensors say 1"):
        load_clear(str(tmp_path / "clear_local_2_down_2.safetensors"), pipe)
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "weights.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut.safetensors is not a readable .safetensors file"):
        load_clear(str(tmp_path / "cut.safetensors"), pipe, radius=2)


def flux_images(pipe, **extra):
    return pipe(height=32, width=48, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="pt", max_sequence_length=6, **tiny.embeds("flux"), **extra).images


def test_clear_takes_the_official_per_call_proportional_attention(flux_folder, tmp_path):
    """``joint_attention_kwargs={"proportional_attention": True}`` (CLEAR's notebook) gives the official
    ``train_seq_len = 64² + 512`` scale for that call; unknown keys and other mechanisms are refused."""
    path = str(tmp_path / "clear_local_2.safetensors")
    pipe = tiny.load(flux_folder)
    clear_file(path, pipe.transformer)
    load_clear(path, pipe, install=True)
    plain = flux_images(pipe)
    switched = flux_images(pipe, joint_attention_kwargs={"proportional_attention": True})
    ref = tiny.load(flux_folder)
    adapter = load_clear(path, ref, install=True, train_seq_len=64 ** 2 + 512)
    torch.testing.assert_close(switched, flux_images(ref), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(plain, flux_images(ref, joint_attention_kwargs={"proportional_attention": False}),
                               rtol=1e-6, atol=1e-6)
    assert (switched - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"joint_attention_kwargs \['proportional_atention'\] are not taken"):
        flux_images(pipe, joint_attention_kwargs={"proportional_atention": True})
    with pytest.raises(ValueError, match="proportional_attention must be a bool"):
        flux_images(pipe, joint_attention_kwargs={"proportional_attention": "yes"})
    adapter.uninstall()
    DiffusersAdapter.construct_for(ref, "lit")
    with pytest.raises(ValueError, match="LiTProcessor has no softmax scale"):
        flux_images(ref, joint_attention_kwargs={"proportional_attention": True})

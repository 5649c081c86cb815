"""``linvision sample``: tiny local DiT and SD pipelines at 4x their training resolution, the SDEdit
upscaling recipe, the low-memory switches (exact), and clear errors. All offline, on CPU."""
import json

import pytest
import torch
import yaml
from PIL import Image

from linvision.cli import main
from linvision.diffusers import DiffusersAdapter
from linvision.sample.config import ConfigError, load_config
from linvision.sample.highres import ntk_rope, stage_sizes, unpack_flux_latents
from linvision.sample.memory import batch_chunked, ffn_chunked, vae_switches
from tests import tiny_diffusers as tiny
from tests.jobs.user_errors import user_error


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "pipe"
    pipe = tiny.build_dit()
    pipe.save_pretrained(folder)
    adapter = DiffusersAdapter.construct_for(pipe, "lit")
    adapter.save_pretrained(folder.parent / "lit-adapter")
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipe = tiny.build_sd(tokenizer_folder=str(root / "tok"))
    pipe.save_pretrained(root / "pipe")
    DiffusersAdapter.construct_for(pipe, "linfusion").save_pretrained(root / "linfusion")
    return root / "pipe"


def write_config(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_dit_at_4x_training_resolution_with_adapter_and_sdedit(dit_folder, tmp_path, capsys):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {
        "pipeline": {"model": str(dit_folder), "adapter": str(dit_folder.parent / "lit-adapter"), "device": "cpu"},
        "sampling": {"class_labels": [1, 2], "seeds": [0, 1], "height": 128, "width": 128, "steps": 3,
                     "guidance": 2.0, "batch_size": 3},
        "highres": {"enabled": True, "stages": 2, "strength": 0.5},
        "output": {"dir": str(out), "prefix": "dit"},
    })
    assert main(["sample", "--config", config]) == 0
    report = json.loads((out / "sample.json").read_text())
    assert len(report["images"]) == 4 and report["resolved"]["adapter"]["mechanism"] == "lit"
    assert report["resolved"]["stages"] == [[32, 32], [64, 64], [128, 128]]
    assert report["timings"]["sampling_s"] > 0 and len(report["timings"]["batches_s"]) == 2
    for rec in report["images"]:
        assert Image.open(out / rec["file"]).size == (128, 128)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 256 and grid.size[1] > 256
    assert "wrote 4 images" in capsys.readouterr().out


def test_sd_at_4x_with_linfusion_prompts_and_memory_switches(sd_folder, tmp_path):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {
        "pipeline": {"model": str(sd_folder), "adapter": str(sd_folder.parent / "linfusion"), "device": "cpu"},
        "sampling": {"prompts": ["a cat", "a red boat"], "negative_prompt": "blurry", "seeds": [3],
                     "height": 128, "width": 96, "steps": 2, "batch_size": 2},
        "memory": {"vae_tiling": True, "cfg_chunks": 2, "ffn_chunks": 2},
        "highres": {"enabled": True, "stages": 1, "strength": 0.5, "latent_reuse": False, "base_with_teacher": True},
        "output": {"dir": str(out)},
    })
    assert main(["sample", "--config", config, "output.prefix=sd"]) == 0
    report = json.loads((out / "sample.json").read_text())
    assert report["resolved"]["vae"]["tiling"] is True and report["resolved"]["ffn_chunked_modules"] > 0
    assert report["resolved"]["stages"] == [[64, 48], [128, 96]]
    assert [r["prompt"] for r in report["images"]] == ["a cat", "a red boat"]
    assert all(Image.open(out / r["file"]).size == (96, 128) for r in report["images"])
    assert (out / "grid.png").exists()


def test_chunked_cfg_and_feed_forward_are_exact(sd_folder):
    pipe = tiny.load(str(sd_folder))
    DiffusersAdapter.from_pretrained(str(sd_folder.parent / "linfusion")).install(pipe)
    reference = tiny.run(pipe, "unet", 48, 32)
    with batch_chunked(pipe.unet, 2), ffn_chunked(pipe.unet, 3) as n:
        chunked = tiny.run(pipe, "unet", 48, 32)
    assert n == 4
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=0)
    assert "forward" not in pipe.unet.__dict__  # restored
    assert torch.equal(tiny.run(pipe, "unet", 48, 32), reference)


def test_bad_sizes_and_configs_give_clear_errors(dit_folder, tmp_path, capsys):
    out = tmp_path / "o"
    base = {"pipeline": {"model": str(dit_folder), "device": "cpu"}, "sampling": {"class_labels": [1], "steps": 1},
            "output": {"dir": str(out)}}
    config = write_config(tmp_path / "c.yaml", base)
    cases = {  # override(s) -> what the one-line message says
        ("sampling.height=40", "sampling.width=40"): "sampling.height/width: height=40, width=40 must be a positive "
                                                     "multiple of the latent stride 16",
        ("sampling.height=32", "sampling.width=64"): "sampling.height/width: DiT samples square images only",
        ("sampling.class_labels=[]", "sampling.prompts=[a cat]"): "DiT is class-conditional",
        ("sampling.class_labels=[5000]",): "sampling.class_labels: DiTPipeline has 1000 classes, so class ids must be "
                                           "in [0, 999]; got [5000]",
        ("sampling.hieght=64",): "unknown key(s) sampling.hieght",
        ("pipeline.dtype=float8",): "pipeline.dtype must be one of 'float32', 'float16', 'bfloat16'; got 'float8'",
        ("sampling.guidance=.nan",): "sampling.guidance must be finite, got nan",
        (f"pipeline.model={tmp_path / 'nope'}",): f"pipeline.model: no diffusers pipeline folder at {tmp_path / 'nope'}",
        (f"pipeline.adapter={tmp_path / 'nope'}",): f"pipeline.adapter: no adapter folder at {tmp_path / 'nope'}",
        (f"pipeline.model={tmp_path}",): f"pipeline.model: {tmp_path} is not a diffusers pipeline folder: it has no "
                                         "model_index.json",
    }
    for overrides, expected in cases.items():
        assert expected in user_error(capsys, ["sample", "--config", config, *overrides], out), overrides
    assert "pipeline.model is required" in user_error(capsys, ["sample", "sampling.height=64"])
    with pytest.raises(ConfigError, match="expected int"):
        load_config(config, ["sampling.steps=many"])
    assert load_config(config, ["sampling.seeds=5", "highres.strength=5e-1"]).sampling.seeds == [5]


def test_highres_helpers():
    assert stage_sizes((32, 64), (128, 256), 2, 16) == [(32, 64), (64, 128), (128, 256)]
    assert vae_switches(4096, 4096, 1, None, None, 1024 * 1024) == {"tiling": True, "slicing": False}
    assert vae_switches(512, 512, 2, None, False, 1024 * 1024) == {"tiling": False, "slicing": False}
    from diffusers import FluxPipeline

    packed = torch.randn(2, 6 * 4, 16)
    torch.testing.assert_close(unpack_flux_latents(packed, 96, 64, 8), FluxPipeline._unpack_latents(packed, 96, 64, 8))
    transformer = tiny.build_flux().transformer
    ids = torch.zeros(4, 3)
    ids[:, 1] = torch.arange(4)
    plain = transformer.pos_embed(ids)[0]
    with ntk_rope(transformer, 10.0):
        scaled = transformer.pos_embed(ids)[0]
    assert not torch.allclose(plain, scaled) and torch.equal(transformer.pos_embed(ids)[0], plain)


def clear_checkpoint(path, transformer):
    """A CLEAR-layout file (image-stream projections of every FLUX attention) with perturbed teacher weights."""
    from diffusers.models.transformers.transformer_flux import FluxAttention
    from safetensors.torch import save_file

    state = {}
    for name, attn in transformer.named_modules():
        if isinstance(attn, FluxAttention):
            for sub in ["to_q", "to_k", "to_v"] + (["to_out.0"] if hasattr(attn, "to_out") else []):
                for pname, p in attn.get_submodule(sub).named_parameters():
                    state[f"{name}.{sub}.{pname}"] = p.detach() * 1.1
    save_file(state, path)


@pytest.mark.parametrize("latent_reuse", [False, True])
def test_flux_clear_highres_recipe(tmp_path, latent_reuse):
    """CLEAR's recipe on a tiny FLUX: full-attention base, SDEdit upscale with the CLEAR checkpoint,
    NTK-scaled RoPE, proportional attention, no dynamic shifting; 4x the 32 px base per side."""
    pipe = tiny.build_flux(tokenizer_folder=str(tmp_path / "tok"))
    pipe.save_pretrained(tmp_path / "flux")
    clear_checkpoint(tmp_path / "clear_local_2.safetensors", pipe.transformer)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", {
        "pipeline": {"model": str(tmp_path / "flux"), "clear_checkpoint": str(tmp_path / "clear_local_2.safetensors"),
                     "adapter_options": {"train_seq_len": 80}, "device": "cpu",
                     "scheduler_overrides": {"use_dynamic_shifting": False}},
        "sampling": {"prompts": ["a lighthouse"], "seeds": [0], "height": 128, "width": 64, "steps": 2,
                     "guidance": 3.5, "max_sequence_length": 16},
        "highres": {"enabled": True, "base_height": 32, "base_width": 16, "stages": 2, "strength": 0.7,
                    "latent_reuse": latent_reuse, "base_with_teacher": True, "rope_ntk_factor": 10.0},
        "output": {"dir": str(out)},
    })
    assert main(["sample", "--config", config]) == 0
    report = json.loads((out / "sample.json").read_text())
    assert report["resolved"]["adapter"]["mechanism"] == "clear"
    assert report["resolved"]["stages"] == [[32, 16], [64, 32], [128, 64]]
    assert Image.open(out / report["images"][0]["file"]).size == (64, 128)

"""The SANA family in the diffusers adapters: any fitting mechanism replaces every ``attn1`` of a tiny random
``SanaTransformer2DModel`` (pipeline with its 32× DC-AE), runs at two resolutions and uninstalls bit for bit;
the ``sana`` mechanism with inherited weights is SANA's own attention; save/load gives identical images."""
import pytest
import torch
from diffusers import SanaTransformer2DModel

from linvision.diffusers import DiffusersAdapter
from tests import tiny_diffusers as tiny

MECHANISMS = ("sana", "clear", "lit", "nala", "lina", "linear")
SIZES = ((64, 64), (96, 64))  # 2×2 and 3×2 latents of the 32× VAE
OPTIONS = {"clear": {"radius": 1}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("sana") / "pipe"
    tiny.build_sana().save_pretrained(path)
    return str(path)


def images(pipe, size, seed=0):
    """Latents of a 2-step run (the VAE decode is not what these tests are about, and dominates the time)."""
    with torch.no_grad():
        return pipe(height=size[0], width=size[1], num_inference_steps=2, use_resolution_binning=False,
                    generator=torch.Generator().manual_seed(seed), output_type="latent", **tiny.embeds("sana")).images


@pytest.fixture(scope="module")
def teacher(folder):
    """The loaded pipeline, its latents at both sizes and its denoiser state (restored after every test)."""
    pipe = tiny.load(folder)
    return pipe, [images(pipe, size) for size in SIZES], {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_mechanism_runs_at_two_resolutions_and_uninstalls_exactly(teacher, mechanism):
    pipe, reference, state = teacher
    adapter = DiffusersAdapter.construct_for(pipe, mechanism, **OPTIONS.get(mechanism, {}))
    assert adapter.config.family == "sana" and len(adapter.config.modules_list) == 2
    assert all(e["module_name"].endswith("attn1") for e in adapter.config.modules_list)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # away from the teacher, so the adapter is visibly in the loop
    for size, ref in zip(SIZES, reference):
        out = images(pipe, size)
        assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    adapter.uninstall()
    assert torch.equal(images(pipe, SIZES[1]), reference[1])
    after = pipe.transformer.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in after)


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_sana_mechanism_is_the_teachers_attention(qk_norm):
    """``construct_for(…, "sana")`` inherits to_q/k/v/out (and SANA-1.5's QK norms): the denoiser output is the
    teacher's up to fp32 rounding."""
    torch.manual_seed(0)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=8, sample_size=2, qk_norm=qk_norm).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    x, text = torch.randn(2, 4, 7, 9), torch.randn(2, 5, 8)
    call = lambda: model(x, encoder_hidden_states=text, timestep=torch.tensor([500.0, 20.0])).sample  # noqa: E731
    with torch.no_grad():
        reference = call()
        adapter = DiffusersAdapter.construct_for(model, "sana")
        assert all(e["options"].get("qk_norm") is (qk_norm is not None) for e in adapter.config.modules_list)
        out = call()
    assert float((out - reference).norm() / reference.norm()) < 1e-6
    adapter.uninstall()
    with torch.no_grad():
        assert torch.equal(call(), reference)


def test_save_load_round_trip_gives_identical_images(folder, tmp_path):
    pipe = tiny.load(folder)
    adapter = DiffusersAdapter.construct_for(pipe, "sana")
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    first = images(pipe, SIZES[1])
    adapter.save_pretrained(tmp_path / "adapter")
    fresh = tiny.load(folder)
    loaded = DiffusersAdapter.from_pretrained(str(tmp_path / "adapter")).install(fresh)
    assert loaded.config.mechanism == "sana" and loaded.config.family == "sana"
    assert torch.equal(images(fresh, SIZES[1]), first)


def test_another_qk_norm_is_refused():
    torch.manual_seed(0)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=8, sample_size=2, qk_norm="rms_norm")
    with pytest.raises(ValueError, match="unsupported QK norm"):
        DiffusersAdapter.construct_for(model, "sana")


def test_denoiser_step_benchmark_compares_sanas_own_attention_clear_and_the_sana_mixer():
    from linvision.benchmarks.denoiser_memory import denoiser_step_memory

    rows = denoiser_step_memory("sana", sizes=(4, 8), width=32, depth=1, heads=2)
    assert [r["variant"] for r in rows] == ["sana-own", "clear", "sana"] * 2
    assert [r["tokens"] for r in rows] == [16] * 3 + [64] * 3
    assert all(r["peak_mib"] > 0 and r["ms"] > 0 for r in rows)

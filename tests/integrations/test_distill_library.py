"""``linvision.distill``: each loss term goes down on a fixed batch, the scheduler targets, feature hooks and
their layer-name errors, trainable selection by name (LinFusion, CLEAR), and one step on every family.
Tiny random-weight teachers built from configs; offline, CPU."""
from __future__ import annotations

import pytest
import torch

from linvision.distill import DistillPair, LossWeights, Objective, conditioner_for, resolve_layers, select_trainable
from linvision.distill.conditioning import pack_flux, unpack_flux
from linvision.distill.loss import distill_loss, split_prediction
from tests import tiny_diffusers as tiny
from tests.helpers import one_thread  # noqa: F401  (autouse)

# latent shape (C, h, w) and a condition per family (random text embeddings, as the tiny pipelines expect)
LATENT = {"unet": (4, 8, 8), "dit": (4, 4, 4), "pixart": (4, 8, 8), "sd3": (4, 8, 8), "flux": (1, 8, 8)}


def condition(family: str, batch: int, conditioner):
    if family == "dit":
        return conditioner.labels(list(range(batch)))
    e = tiny.embeds(family, batch)
    keys = {"unet": ["prompt_embeds"], "pixart": ["prompt_embeds", "prompt_attention_mask"],
            "sd3": ["prompt_embeds", "pooled_prompt_embeds"], "flux": ["prompt_embeds", "pooled_prompt_embeds"]}
    return {k: e[k] for k in keys[family]}


def fixed_batch(family: str, objective: Objective, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    shape = (batch, *LATENT[family])
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), objective.sample_indices(batch, g)


@pytest.mark.parametrize("term", ["task", "output", "feature", "variance"])
def test_each_loss_term_goes_down_on_a_fixed_batch(term):
    """A LiT student (fresh q/k/v, so every term starts away from the teacher) of a learned-sigma DiT: 150 AdamW
    steps on that term alone more than halve it (the task term, 25%: only the attention trains)."""
    pipe = tiny.build_dit()
    pair = DistillPair.build(pipe, "lit", inherit="none", trainable=["adapter"], feature_layers="all")
    objective, conditioner = Objective(pipe.scheduler), conditioner_for(pipe)
    x0, noise, index = fixed_batch("dit", objective)
    cond = condition("dit", 4, conditioner)
    weights = LossWeights(**{k: float(k == term) for k in ("task", "output", "feature", "variance")})
    optimizer = torch.optim.AdamW(pair.trainable_parameters(), lr=3e-3)
    history = []
    for _ in range(150):
        terms = pair.losses(x0, noise, index, cond, objective, conditioner, weights)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        pair.clear()
        history.append(float(terms[term].detach()))
    assert set(terms) == ({"loss", "task"} if term == "task" else {"loss", "task", "output", "feature", "variance"})
    assert history[-1] < history[0] * (0.75 if term == "task" else 0.5), (history[0], history[-1])


def test_combined_loss_goes_down_and_only_chosen_parameters_change():
    """LinFusion's weights on a tiny SD UNet: the total falls; the teacher and every frozen student weight stay
    bit-identical, every adapter weight moves."""
    pipe = tiny.build_sd()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pair = DistillPair.build(pipe, "linfusion", trainable=["adapter"], feature_layers="all")
    assert len(pair.layers) == 4 and all(n.endswith("attn1") for n in pair.layers)
    objective, conditioner = Objective(pipe.scheduler), conditioner_for(pipe)
    x0, noise, index = fixed_batch("unet", objective)
    cond = condition("unet", 4, conditioner)
    optimizer = torch.optim.AdamW(pair.trainable_parameters(), lr=1e-3)
    adapter_before = {k: v.clone() for k, v in pair.adapter.state_dict().items()}
    losses = []
    for _ in range(60):
        terms = pair.losses(x0, noise, index, cond, objective, conditioner, LossWeights(1.0, 0.5, 0.5, 0.0))
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(terms["loss"].detach()))
    assert losses[-1] < losses[0]
    for name, value in pair.teacher.state_dict().items():
        assert torch.equal(value, before[name]), name
    trainable = set(pair.trainable)
    student = dict(pair.student.named_parameters())
    frozen = [n for n in student if n not in trainable]
    assert frozen and all(torch.equal(student[n], before[n]) for n in frozen if n in before)
    assert all(not torch.equal(v, adapter_before[k]) for k, v in pair.adapter.state_dict().items() if v.is_floating_point())
    pair.adapter.uninstall()
    for name, value in pipe.unet.state_dict().items():  # the uninstalled denoiser is the teacher again
        assert torch.equal(value, before[name]), name


def test_objective_targets_match_diffusers_schedulers():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    index = torch.tensor([0, 499, 999])
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    obj = Objective(ddpm)
    assert obj.kind == "v_prediction" and obj.model_timestep(index).tolist() == index.tolist()
    torch.testing.assert_close(obj.add_noise(x0, noise, index), ddpm.add_noise(x0, noise, index))
    torch.testing.assert_close(obj.target(x0, noise, index), ddpm.get_velocity(x0, noise, index))
    assert torch.equal(Objective(DDPMScheduler()).target(x0, noise, index), noise)
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    obj = Objective(flow)
    sigma = flow.sigmas[index].reshape(-1, 1, 1, 1)
    assert obj.kind == "flow"
    torch.testing.assert_close(obj.add_noise(x0, noise, index), (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(obj.target(x0, noise, index), noise - x0)
    torch.testing.assert_close(obj.model_timestep(index), flow.timesteps[index])
    flow.set_timesteps(4)  # sampling with the pipeline's scheduler does not move the training table
    torch.testing.assert_close(obj.add_noise(x0, noise, index), (1 - sigma) * x0 + sigma * noise)
    with pytest.raises(ValueError, match="prediction_type"):
        Objective(DDPMScheduler(prediction_type="nope"))


def test_unknown_feature_layers_are_a_clear_error_listing_the_valid_names():
    valid = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert resolve_layers(valid, "all") == valid and resolve_layers(valid, []) == []
    assert resolve_layers(valid, ["transformer_blocks.1.*"]) == valid[1:]
    with pytest.raises(ValueError, match=r"unknown layer name.*'blocks.0.attn'.*valid names \(2\).*transformer_blocks.0.attn1"):
        resolve_layers(valid, ["transformer_blocks.0.attn1", "blocks.0.attn"])
    with pytest.raises(ValueError, match="unknown layer name"):
        resolve_layers(valid, ["single_*"])
    pipe = tiny.build_dit()
    with pytest.raises(ValueError, match="valid names"):
        DistillPair.build(pipe, "lit", feature_layers=["transformer_blocks.7.attn1"])
    assert not any("mixer" in n for n, _ in pipe.transformer.named_modules())  # the failed build left no adapter


def test_clear_trainable_patterns_select_the_image_stream_and_pooling():
    """CLEAR's name filter on a tiny FLUX: image-stream to_q/k/v/out of every block + spatial_weight, nothing else;
    the same set as the adapter's parameters. A pattern that matches nothing is an error."""
    pipe = tiny.build_flux()
    patterns = ["*.attn.to_q.*", "*.attn.to_k.*", "*.attn.to_v.*", "*.attn.to_out.*", "*spatial_weight"]
    pair = DistillPair.build(pipe, "clear", options={"radius": 2, "pool_factor": 2}, trainable=patterns,
                             feature_layers=["single_transformer_blocks.*"])
    assert pair.layers == ["single_transformer_blocks.0.attn"]
    names = pair.trainable
    assert any(n.endswith("processor.spatial_weight") for n in names)
    assert not any(k in n for n in names for k in ("add_q_proj", "to_add_out", "norm_q", "ff.", "proj_out"))
    assert {id(p) for p in pair.trainable_parameters()} == {id(p) for p in pair.adapter.parameters()}
    assert not pair.trains_outside_adapter()
    with pytest.raises(ValueError, match="matches no parameter"):
        select_trainable(pipe.transformer, ["*.nothing.*"])


@pytest.mark.parametrize("family,mechanism,options", [
    ("unet", "linfusion", {}), ("pixart", "lit", {}), ("sd3", "clear", {"radius": 2}),
    ("flux", "clear", {"radius": 2, "pool_factor": 2}), ("dit", "dydila", {}), ("dit", "lina", {})])
def test_one_step_on_every_family(family, mechanism, options):
    """One distillation step per family: finite terms (flow-matching for SD3/FLUX), gradients reach exactly the
    trainable parameters, and the feature term sees every replaced attention."""
    pipe = tiny.BUILDERS[family]()
    pair = DistillPair.build(pipe, mechanism, options=options, trainable=["adapter"], feature_layers="all")
    objective, conditioner = Objective(pipe.scheduler), conditioner_for(pipe)
    assert objective.kind == ("flow" if family in ("sd3", "flux") else "epsilon")
    x0, noise, index = fixed_batch(family, objective, batch=2)
    learned_sigma = family in ("dit", "pixart")
    weights = LossWeights(1.0, 0.5, 0.5, 0.05 if learned_sigma else 0.0)
    terms = pair.losses(x0, noise, index, condition(family, 2, conditioner), objective, conditioner, weights)
    assert ("variance" in terms) == learned_sigma
    assert all(torch.isfinite(v) for v in terms.values()) and float(terms["feature"].detach()) >= 0
    terms["loss"].backward()
    grads = {n for n, p in pair.student.named_parameters() if p.grad is not None}
    assert grads and grads <= set(pair.trainable)
    assert all(p.grad is None for p in pair.teacher.parameters())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for checkpointing in (False, True):
        pipe = tiny.build_dit()
        torch.manual_seed(0)
        pair = DistillPair.build(pipe, "lit", trainable=["*"])
        if checkpointing:
            pair.student.enable_gradient_checkpointing()
        objective, conditioner = Objective(pipe.scheduler), conditioner_for(pipe)
        x0, noise, index = fixed_batch("dit", objective)
        terms = pair.losses(x0, noise, index, condition("dit", 4, conditioner), objective, conditioner, LossWeights())
        terms["loss"].backward()
        results.append((float(terms["loss"].detach()), [p.grad.clone() for p in pair.trainable_parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_helpers():
    x = torch.randn(2, 4, 3, 3)
    out = torch.cat([x, x + 1], 1)
    pred, var = split_prediction(out, 4)
    assert torch.equal(pred, x) and torch.equal(var, x + 1) and split_prediction(x, 4)[1] is None
    with pytest.raises(ValueError, match="learned-sigma"):
        distill_loss(x, x, LossWeights(feature=0.0, variance=0.1), teacher_out=x)
    with pytest.raises(ValueError, match="no feature layers"):
        distill_loss(x, x, LossWeights(), teacher_out=x)
    terms = distill_loss(out, x, LossWeights(1, 0.5, 0.5, 0.05), teacher_out=out, student_features=[(x, x)],
                         teacher_features=[(x, x + 2)])
    assert float(terms["task"]) == 0 and float(terms["feature"]) == pytest.approx(2.0)  # mean of 0 and 4
    tokens = pack_flux(torch.arange(2 * 3 * 4 * 6.0).reshape(2, 3, 4, 6))
    assert tokens.shape == (2, 6, 12) and torch.equal(unpack_flux(tokens, 4, 6), torch.arange(144.0).reshape(2, 3, 4, 6))


def test_linfusion_xl_mid_dim_scale_sets_each_layers_mlp_width():
    """LinFusion-XL's --mid_dim_scale=16 (m = C/16 per layer), here 2 on the tiny UNet's 8-channel attentions."""
    from linvision.diffusers import DiffusersAdapter

    adapter = DiffusersAdapter.construct_for(tiny.build_sd(), "linfusion", projection_mid_dim_scale=2)
    assert all(e["options"]["projection_mid_dim"] == e["dim"] // 2 for e in adapter.config.modules_list)
    assert all(layer.to_q_[0].out_features == 4 for layer in adapter.layers())
    with pytest.raises(ValueError, match="not both"):
        DiffusersAdapter.construct_for(tiny.build_sd(), "linfusion", projection_mid_dim=4, projection_mid_dim_scale=2)


@pytest.mark.parametrize("mechanism", ["hedgehog", "lolcats"])
def test_attention_transfer_term_trains_only_the_feature_maps(mechanism):
    """Stage 1 of the Hedgehog/LoLCATs recipes on a tiny DiT: the attention-weight cross-entropy alone, only the
    feature maps (and window factors) trainable; the term falls and nothing else moves."""
    pipe = tiny.build_dit()
    patterns = ["*feature_map_*"] + (["*window_factors"] if mechanism == "lolcats" else [])
    # lolcats' default radius 5 covers the tiny grid whole (all softmax, nothing for the feature maps to learn)
    options = {"radius": 1} if mechanism == "lolcats" else None
    pair = DistillPair.build(pipe, mechanism, options=options, trainable=patterns, feature_layers=[])
    assert pair.trainable and all("feature_map" in n or "window_factors" in n for n in pair.trainable)
    objective, conditioner = Objective(pipe.scheduler), conditioner_for(pipe)
    x0, noise, index = fixed_batch("dit", objective, batch=2)
    cond = condition("dit", 2, conditioner)
    weights = LossWeights(task=0.0, output=0.0, feature=0.0, variance=0.0, attention=1.0)
    before = {k: v.clone() for k, v in pair.student.state_dict().items()}
    optimizer = torch.optim.AdamW(pair.trainable_parameters(), lr=3e-2)
    history = []
    for _ in range(15):
        terms = pair.losses(x0, noise, index, cond, objective, conditioner, weights)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(float(terms["attention"].detach()))
    assert history[-1] < history[0]
    changed = {k for k, v in pair.student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(pair.trainable)

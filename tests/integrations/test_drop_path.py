"""Per-sample seeded drop-path: a batch split over processes (simulated here) draws the same masks as one batch."""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath as TimmDropPath

import linvision  # noqa: F401  (registers the models)
from linvision.models.care import CARETransformer
from linvision.models.drop_path import DropPath, drop_path_modules, per_sample_drop_path
from tests.helpers import one_thread, rel_err  # noqa: F401  (one_thread: autouse fixture)

KEYS = [(7, 2, i) for i in (5, 17, 3, 40, 8, 1, 22, 9)]  # (seed, epoch, dataset index) of a global batch of 8
TINY_VIT = dict(mixer="linear", img_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=3,
                drop_path_rate=0.6)
MODELS = {  # every linvision family whose blocks hold a DropPath, tiny, with drop-path on
    "linvit": lambda: timm.create_model("linvit_tiny_patch16_224", **TINY_VIT),
    "lion_vit": lambda: timm.create_model("lion_vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=2,
                                          num_heads=2, num_classes=3, drop_path_rate=0.5),
    "vig": lambda: timm.create_model("vig_tiny_patch16_224", img_size=32, embed_dim=16, depth=2, num_heads=2,
                                     num_classes=3, drop_path_rate=0.5),
    "nalaformer": lambda: timm.create_model("nalaformer_t", embed_dims=(8, 16, 16, 16), depths=(1, 1, 2, 1),
                                            num_heads=(1, 2, 2, 4), mlp_ratios=(2,) * 4, projection=24, num_classes=3,
                                            drop_path_rate=0.5),
    "plstm_vis": lambda: timm.create_model("plstm_vis_t", img_size=32, patch_size=8, embed_dim=16, num_heads=2,
                                           num_blocks=2, num_classes=3, drop_path_rate=0.5),
    "care": lambda: CARETransformer(depths=(1, 1, 2, 1), feat_dims=(6, 12, 24, 24), mem_dims=(2, 4, 8, 8),
                                    ratios=((2, 2),) * 4, att_head_dim=(1, 1, 4, 4), cls_dim=64, num_classes=3,
                                    drop_path_rate=0.5),
}
SIZES = {"linvit": 16, "lion_vit": 16}


def build(name):
    """The model in training mode, except BatchNorm (CARE, NaLaFormer): its batch statistics are per process under
    DDP whatever drop-path does (SyncBatchNorm aside), so running statistics keep this comparison to drop-path."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def batch(size, n=len(KEYS)):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_outside_the_context_it_is_timms_drop_path():
    x = torch.randn(16, 5, 4)
    torch.manual_seed(1)
    ours = DropPath(0.3).train()(x)
    torch.manual_seed(1)
    assert torch.equal(ours, TimmDropPath(0.3).train()(x))
    assert torch.equal(DropPath(0.3).eval()(x), x)
    with per_sample_drop_path(DropPath(0.3).eval(), [(0, 0, i) for i in range(16)]):
        assert torch.equal(DropPath(0.3).eval()(x), x)
    assert isinstance(DropPath(0.1), TimmDropPath)


def test_masks_follow_the_sample_not_the_batch():
    m = DropPath(0.5).train()
    ones = torch.ones(len(KEYS), 3)
    with per_sample_drop_path(m, KEYS):
        full = m(ones)
    halves = []
    for part in (slice(0, 3), slice(3, 8)):  # an uneven split, in another order of calls
        with per_sample_drop_path(m, KEYS[part]):
            halves.append(m(ones[part]))
    assert torch.equal(torch.cat(halves), full)
    assert set(full.unique().tolist()) <= {0.0, 2.0}  # kept samples scaled by 1 / keep_prob
    assert m.sample_uniforms is None  # restored on exit
    with per_sample_drop_path(m, KEYS[::-1]):
        assert torch.equal(m(ones), full.flip(0))  # a sample's mask does not depend on its place in the batch
    with per_sample_drop_path(m, [(8, 2, i) for i in (5, 17, 3, 40, 8, 1, 22, 9)]):
        assert not torch.equal(m(ones), full)  # another seed, other masks


def test_drop_rate_and_independence_across_modules():
    model = torch.nn.Sequential(*[DropPath(0.3) for _ in range(4)]).train()
    keys = [(0, 0, i) for i in range(500)]
    ones = torch.ones(500, 1)
    with per_sample_drop_path(model, keys):
        kept = torch.stack([(m(ones) > 0).float().squeeze(1) for m in model])  # (modules, samples)
    assert 0.25 < 1 - kept.mean().item() < 0.35
    assert all(not torch.equal(kept[0], kept[j]) for j in range(1, 4))  # each module decides on its own


def test_wrong_key_count_and_bad_keys_are_clear_errors():
    m = DropPath(0.5).train()
    with per_sample_drop_path(m, KEYS[:3]), pytest.raises(ValueError, match="3 sample keys.*batch of 8"):
        m(torch.ones(8, 2))
    with pytest.raises(ValueError, match="non-negative"):
        with per_sample_drop_path(m, [(-1, 0, 0)]):
            pass
    with pytest.raises(ValueError, match="drop_prob must be in"):
        DropPath(1.5)
    with pytest.raises(ValueError, match="scale_by_keep must be a bool"):
        DropPath(0.1, scale_by_keep=1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_two_process_split_matches_the_full_batch(name):
    """Outputs and (DDP-averaged) gradients of two half-batches equal the full batch's; with the global
    generator (timm's DropPath) they do not."""
    model = build(name)
    modules = drop_path_modules(model)
    assert modules and not any(isinstance(m, TimmDropPath) and not isinstance(m, DropPath) for m in model.modules())
    calls = {id(m): 0 for m in modules}
    for m in modules:
        m.register_forward_pre_hook(lambda mod, args: calls.__setitem__(id(mod), calls[id(mod)] + 1))
    x, y = batch(SIZES.get(name, 32))
    with per_sample_drop_path(model, KEYS):
        out = model(x)
        F.cross_entropy(out, y).backward()
    assert set(calls.values()) == {1}  # one instance per residual branch: no module draws twice per forward
    full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    outs = []
    for part in (slice(0, 4), slice(4, 8)):  # rank 0, rank 1
        with per_sample_drop_path(model, KEYS[part]):
            outs.append(model(x[part]))
            (F.cross_entropy(outs[-1], y[part]) / 2).backward()  # DDP averages the two processes' gradients
    assert rel_err(torch.cat(outs), out) <= 1e-6
    for n, g in full.items():
        assert rel_err(dict(model.named_parameters())[n].grad, g) <= 1e-5, n
    assert any(rel_err(_unseeded(model, x, s, split=True), _unseeded(model, x, s, split=False)) > 1e-3
               for s in range(5, 10))  # with the global generator the split changes the masks


def _unseeded(model, x, seed, split):
    torch.manual_seed(seed)
    with torch.no_grad():
        return torch.cat([model(x[:4]), model(x[4:])]) if split else model(x)


def test_activation_checkpointing_recomputes_the_same_masks():
    model = build("nalaformer")
    x, y = batch(32)
    with per_sample_drop_path(model, KEYS):
        F.cross_entropy(model(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    with per_sample_drop_path(model, KEYS):
        F.cross_entropy(model(x), y).backward()
    for n, g in plain.items():
        assert rel_err(dict(model.named_parameters())[n].grad, g) <= 1e-6, n

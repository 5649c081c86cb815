"""linearize() of timm's RoPE and qk-norm ViTs (EVA02, vit_*_rope_*, Attention(qk_norm=True)).

The mixers must see the teacher's q and k exactly (norms and RoPE applied as timm does) up to where the
mechanism differs: softmax-type mixers reproduce the teacher; linear ones take RoFormer's linear form.
"""
import copy
import math

import pytest
import timm
import torch
from timm.layers.pos_embed_sincos import apply_rot_embed_cat

from linvision.mixers import create_mixer, mixers_supporting
from linvision.mixers.rotary import Rotation
from linvision.timm import linearize

TINY = dict(pretrained=False, img_size=32, patch_size=8, num_classes=3, embed_dim=32, num_heads=2)
FAMILIES = {  # name, extra timm kwargs
    "eva02": ("eva02_tiny_patch14_224", {}),
    "eva02_qk_norm_unfused": ("eva02_tiny_patch14_224", {"qk_norm": True, "qkv_fused": False}),
    "rope_axial": ("vit_small_patch16_rope_224", {}),
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {"depth": 2}),  # a RoPE per block
    "rope_half": ("vit_small_patch16_rope_224", {"rope_rotate_half": True}),
    "rope_reg_gap": ("vit_medium_patch16_rope_reg1_gap_256", {}),
    "vit_qk_norm": ("vit_tiny_patch16_224", {"qk_norm": True}),
}
GLOBAL = {"softmax": {}, "clear": {"radius": 8}, "lolcats": {"radius": 8}}  # windows cover the 4x4 grid
LINEAR = {"linear": {}, "hedgehog": {}, "lolcats": {"radius": 1}}


def teacher(family: str) -> torch.nn.Module:
    """A tiny random model of ``family`` whose every weight (biases and norms too) is far from its init."""
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **{"depth": 1, **TINY, **extra}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    return model


def teacher_run(family: str):
    """``(teacher, images [2, 3, 32, 32], its logits)``."""
    ref = teacher(family)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return ref, x, ref(x)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_mixers_reproduce_the_teacher(family):
    ref, x, expected = teacher_run(family)
    with torch.no_grad():
        for mixer, options in GLOBAL.items():
            out = linearize(copy.deepcopy(ref), mixer, **options).eval()(x)
            assert rel(out, expected) <= 1e-6, mixer


def test_the_rope_is_what_makes_it_exact():
    ref = teacher("rope_axial")
    student = linearize(copy.deepcopy(ref), "softmax").eval()
    for block in student.blocks:
        block.attn.rope_half = None  # drop the rotation
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(student(x), ref(x)) > 1e-2


def _teacher_qk(model, x):
    """Block 0's q, k of teacher ``model`` after q/k norm and RoPE, ``[B, N, H, D]`` (hooks + timm's rotation)."""
    seen = {}
    attn = model.blocks[0].attn
    hooks = [attn.q_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("q", o)),
             attn.k_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("k", o)),
             attn.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("rope", kw.get("rope")), with_kwargs=True)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    T, rope = model.num_prefix_tokens, seen["rope"]
    half = bool(getattr(attn, "rotate_half", False))
    out = []
    for t in (seen["q"], seen["k"]):  # [B, H, N, D] as timm holds them
        if rope is not None:
            t = torch.cat([t[:, :, :T], apply_rot_embed_cat(t[:, :, T:], rope, half=half)], 2)
        out.append(t.transpose(1, 2))
    return out


@pytest.mark.parametrize("family", ["eva02_qk_norm_unfused", "rope_mixed", "rope_half", "vit_qk_norm"])
def test_linear_mixers_see_the_teachers_q_and_k(family):
    ref = teacher(family)
    x = torch.randn(2, 3, 32, 32)
    q_ref, k_ref = _teacher_qk(ref, x)
    for mixer in LINEAR:
        _check_student_qk(linearize(copy.deepcopy(ref), mixer, **LINEAR[mixer]).eval(), x, q_ref, k_ref)


def _check_student_qk(student, x, q_ref, k_ref):
    seen = {}
    adapter = student.blocks[0].attn
    hook = adapter.mixer.register_forward_pre_hook(lambda m, a: seen.update(args=a, rope=m.current_rope))
    with torch.no_grad():
        student(x)
        hook.remove()
        xin, hw, T = seen["args"]
        rope = seen["rope"]
        q, k, _ = adapter.mixer.project_qkv(xin)
        if rope is not None:
            q, k = rope.apply(q, T), rope.apply(k, T)
    name = type(adapter.mixer).__name__
    assert rel(q, q_ref) <= 1e-6 and rel(k, k_ref) <= 1e-6, name
    if hasattr(adapter.mixer, "attention_rows"):  # what attention transfer takes as the teacher's q, k
        q_rows, k_rows, _ = adapter.mixer.attention_rows(xin, hw, T, rope=rope)
        assert rel(q_rows, q_ref) <= 1e-6 and rel(k_rows, k_ref) <= 1e-6, name


def random_rotation(tokens: int, heads: int, dim: int, half: bool) -> Rotation:
    """A timm-format ``cat(sin, cos)`` embedding of random per-head angles, ``[H, tokens, 2·dim]``."""
    angle = torch.rand(heads, tokens, dim // 2, dtype=torch.float64) * 2 * math.pi
    angle = torch.cat([angle, angle], -1) if half else angle.repeat_interleave(2, -1)
    return Rotation.from_timm(torch.cat([angle.sin(), angle.cos()], -1), half)


def _rotate_dense(t, rot, T):
    """Reference rotation: each pair turned by its angle, image tokens only (``t [B, N, H, m·D]``)."""
    D = rot.sin.shape[-1]
    pick = (lambda e: e[..., : D // 2]) if rot.half else (lambda e: e[..., ::2])
    ang = torch.atan2(pick(rot.sin), pick(rot.cos))  # [N_img, H, D/2]
    blocks = t[:, T:].unflatten(-1, (-1, D))
    if rot.half:
        a, b = blocks[..., : D // 2], blocks[..., D // 2:]
    else:
        a, b = blocks[..., ::2], blocks[..., 1::2]
    c, s = ang.cos()[:, :, None], ang.sin()[:, :, None]
    a2, b2 = a * c - b * s, a * s + b * c
    out = torch.cat([a2, b2], -1) if rot.half else torch.stack([a2, b2], -1).flatten(-2)
    return torch.cat([t[:, :T], out.flatten(-2)], 1)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("mixer", ["linear", "hedgehog"])
def test_linear_rope_is_roformers_form(mixer, half):
    """o_i = Σ_j (R_i φq_i)·(R_j φk_j) v_j / (φq_i·Σ_j φk_j + eps), prefix tokens unrotated; fp64, odd grid."""
    torch.manual_seed(1)
    hw, T, H, D = (3, 5), 2, 2, 6
    m = create_mixer(mixer, H * D, H, backend="torch").double()
    if mixer == "hedgehog":
        with torch.no_grad():
            m.feature_map_q.weight.normal_()
            m.feature_map_k.weight.normal_()
    x = torch.randn(2, T + 15, H * D, dtype=torch.float64)
    rot = random_rotation(15, H, D, half)
    with m.rotation(rot):
        out = m(x, hw, T)
    assert m.current_rope is None
    q, k, v = m.project_qkv(x)
    if mixer == "linear":
        fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    else:
        fq, fk = m.feature_map_q(q), m.feature_map_k(k)
    num = torch.einsum("bnhf,bmhf->bhnm", _rotate_dense(fq, rot, T), _rotate_dense(fk, rot, T))
    den = torch.einsum("bnhf,bmhf->bhnm", fq, fk).sum(-1, keepdim=True) + m.eps
    ref = m.proj(torch.einsum("bhnm,bmhd->bnhd", num / den, v).flatten(2))
    assert rel(out, ref) <= 1e-10


def test_lolcats_rope_fast_path_equals_its_dense_rows():
    torch.manual_seed(2)
    hw, T, H, D = (7, 9), 1, 2, 4
    m = create_mixer("lolcats", H * D, H, radius=2).double()
    with torch.no_grad():
        m.feature_map_q.weight.normal_()
        m.window_factors.normal_()
    x = torch.randn(2, T + 63, H * D, dtype=torch.float64, requires_grad=True)
    rot = random_rotation(63, H, D, False)
    with m.rotation(rot):
        out = m(x, hw, T)
    _, _, v = m.project_qkv(x)
    q, k, rows = m.attention_rows(x, hw, T, rope=rot)
    ref = m.proj(torch.einsum("bhnm,bmhd->bnhd", rows(0, T + 63), v).flatten(2))
    assert rel(out, ref) <= 1e-10
    g, g_ref = torch.autograd.grad(out.square().sum(), x)[0], torch.autograd.grad(ref.square().sum(), x)[0]
    assert rel(g, g_ref) <= 1e-10


@pytest.mark.parametrize("family", ["eva02_qk_norm_unfused", "rope_reg_gap", "vit_qk_norm"])
def test_linearized_forward_backward(family):
    ref, x, _ = teacher_run(family)
    for mixer, options in LINEAR.items():
        student = linearize(copy.deepcopy(ref), mixer, **options)
        out = student(x)
        assert out.shape == (2, 3) and torch.isfinite(out).all(), mixer
        with torch.no_grad():  # a different mechanism (tokens: lolcats' class query is exact softmax)
            assert rel(student.forward_features(x), ref.forward_features(x)) > 1e-4, mixer
        out.sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None), mixer
        _check_norms_copied(student, ref, family)


def _check_norms_copied(student, ref, family):
    if FAMILIES[family][1].get("qk_norm"):  # a copy, inherited
        mixer_norm, teacher_norm = student.blocks[0].attn.mixer.q_norm, ref.blocks[0].attn.q_norm
        assert mixer_norm is not teacher_norm and torch.equal(mixer_norm.weight, teacher_norm.weight)


def test_supported_mixers_are_declared():
    assert {"softmax", "clear", "linear", "hedgehog", "lolcats"} <= set(mixers_supporting("supports_rope"))
    assert {"softmax", "clear", "linear", "hedgehog", "lolcats"} <= set(mixers_supporting("supports_qk_norm"))
    assert "liger" not in mixers_supporting("supports_rope")


@pytest.mark.parametrize("family", ["eva02_qk_norm_unfused", "rope_mixed"])
def test_attention_transfer_teacher_is_the_teachers_attention(family):
    """Teacher forcing returns each layer's softmax teacher, built from the mixer's q/k norms and RoPE: the
    student then computes exactly the teacher model, and the transfer losses are finite."""
    from linvision.distill import AttentionTransfer

    ref, x, expected = teacher_run(family)
    for mixer in ("hedgehog", "lolcats"):
        student = linearize(copy.deepcopy(ref), mixer, **LINEAR[mixer]).eval()
        transfer = AttentionTransfer(student, chunk=5)
        assert rel(student(x), expected) <= 1e-6, mixer
        assert torch.isfinite(transfer.loss()["loss"]), mixer
        transfer.remove()

"""Triton linear attention (interpreted on CPU) against the PyTorch reference: outputs and all gradients."""
import math

import pytest
import torch

from linvision.kernels.linear_attn import linear_attention
from linvision.kernels.linear_attn.naive import linear_attention_naive
from linvision.kernels.linear_attn.triton import (
    MAX_SPLITS,
    chunk_plan,
    partial_buffer_shapes,
    split_plan,
    tile_config,
)
from tests.helpers import rel_err

NAMES = ("q", "k", "v", "q_den", "k_den", "k_weight", "v_weight")
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def make_inputs(B=2, N=63, M=45, H=1, Dk=16, Dv=24, Dd=None, weights=False, dtype=torch.float32, packed=False):
    """Positive features (as after a feature map) for q, k and the denominators; v of either sign.

    Weights: ``k_weight`` a (1, M, H) tensor passed as is (the API expands it), ``v_weight`` a full [B, M, H].
    ``packed``: q, k, v are strided views of one ``qkv`` tensor (``reshape(B, N, 3, H, D).unbind(2)``)
    and the denominator features are transposes of ``[B, H, N, Dd]`` tensors.
    """
    if packed:
        assert N == M and Dk == Dv
        qkv = torch.rand(B, N, 3, H, Dk) + 0.1
        qkv[:, :, 2] -= 0.6
        q, k, v = qkv.to(dtype).unbind(2)
    else:
        q = (torch.rand(B, N, H, Dk) + 0.1).to(dtype)
        k = (torch.rand(B, M, H, Dk) + 0.1).to(dtype)
        v = torch.randn(B, M, H, Dv).to(dtype)
    t = dict(q=q, k=k, v=v)
    if Dd is not None:
        if packed:
            t["q_den"] = (torch.rand(B, H, N, Dd) + 0.1).to(dtype).transpose(1, 2)
            t["k_den"] = (torch.rand(B, H, M, Dd) + 0.1).to(dtype).transpose(1, 2)
        else:
            t["q_den"] = (torch.rand(B, N, H, Dd) + 0.1).to(dtype)
            t["k_den"] = (torch.rand(B, M, H, Dd) + 0.1).to(dtype)
    if weights:
        t["k_weight"] = torch.rand(1, M, H) + 0.5
        t["v_weight"] = torch.rand(B, M, H) + 0.5
    return t


def run(tensors, backend, grad_out=None, upcast=False, **options):
    """Output and gradients of every input; ``upcast``: run on fp32 copies of the (rounded) inputs."""
    leaves = {}
    for name, t in tensors.items():
        x = t.detach()
        if upcast and x.dtype != torch.float32:
            x = x.float()
        leaves[name] = x.requires_grad_()
    args = {name: leaves[name] for name in NAMES[3:] if name in leaves}
    out = linear_attention(leaves["q"], leaves["k"], leaves["v"], backend=backend, **args, **options)
    if grad_out is None:
        grad_out = torch.randn(out.shape).to(out.dtype)
    g = grad_out.float() if upcast else grad_out
    grads = torch.autograd.grad(out, list(leaves.values()), g, allow_unused=True)
    return out, dict(zip(leaves, grads)), grad_out


def compare(tensors, dtype=torch.float32, grad_out=None, **options):
    """Triton (input dtype) against the fp32 reference on the same inputs; returns the relative errors."""
    out, grads, grad_out = run(tensors, "triton", grad_out, **options)
    ref, ref_grads, _ = run(tensors, "torch", grad_out, upcast=True, **options)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    errors = {"out": rel_err(out, ref)}
    for name, g in grads.items():
        r = ref_grads[name]
        if r is None:  # an input the operator does not use (q_den/k_den with normalize='none')
            assert g is None or not g.any(), name
            continue
        assert g is not None, name
        assert g.shape == tensors[name].shape and g.dtype == tensors[name].dtype, name
        assert torch.isfinite(g).all(), name
        errors[name] = rel_err(g, r)
    tol = TOL[dtype]
    bad = {name: e for name, e in errors.items() if not e < tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"
    return errors


def options(normalize, mean):
    return dict(normalize=normalize, mean=mean, scale=None if normalize == "div" else 0.8)


# --- Triton against the reference -------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["div", "sub", "none"])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("den", [False, True])
def test_triton_matches_reference(normalize, mean, den):
    """All modes; N = 63 ≠ M = 45, Dk ≠ Dv, Dd ≠ Dk, weights (one an expanded (1, M, H) tensor) in half the cases."""
    tensors = make_inputs(Dd=12 if den else None, weights=den != mean)
    compare(tensors, **options(normalize, mean))


@pytest.mark.parametrize("normalize", ["div", "sub", "none"])
def test_triton_fp16(normalize):
    tensors = make_inputs(B=1, H=2, N=40, M=33, Dk=16, Dv=20, Dd=8, weights=True, dtype=torch.float16)
    compare(tensors, dtype=torch.float16, **options(normalize, True))


@pytest.mark.parametrize("normalize", ["div", "sub"])
def test_triton_long_sequence_with_splits(normalize):
    """N = M = 1000: several sequence splits in the reduction kernels and several chunks in the others."""
    B, H, D = 1, 2, 32
    cfg = tile_config(D, D, D)
    assert split_plan(1000, cfg.block_t, B * H, cfg.v_tiles, D, 4).splits > 1  # the interpreter's SM count
    assert chunk_plan(1000, cfg.block_t, B * H, cfg.v_tiles, 4).splits > 1
    tensors = make_inputs(B=B, H=H, N=1000, M=1000, Dk=D, Dv=D, Dd=None if normalize == "div" else 16, weights=True)
    compare(tensors, **options(normalize, normalize == "sub"))


@pytest.mark.parametrize("feature_map,offset", [("relu", 0.05), ("elu+1", 0.0), (None, 0.5)])
@pytest.mark.parametrize("normalize", ["div", "sub", "none"])
def test_triton_fused_feature_map(feature_map, offset, normalize):
    """φ applied in the kernels to raw (signed) q, k, q_den, k_den; gradients chained through φ."""
    B, N, M, H, Dk, Dv, Dd = 1, 40, 29, 2, 16, 12, 8
    tensors = dict(q=torch.randn(B, N, H, Dk), k=torch.randn(B, M, H, Dk), v=torch.randn(B, M, H, Dv))
    if feature_map != "relu":
        tensors.update(q_den=torch.randn(B, N, H, Dd), k_den=torch.randn(B, M, H, Dd), v_weight=torch.rand(B, M, H))
    if feature_map is None:  # identity + offset: keep the denominators positive
        tensors = {n: t.abs() if n != "v" else t for n, t in tensors.items()}
    compare(tensors, feature_map=feature_map, feature_offset=offset, **options(normalize, True))


def test_triton_fused_feature_map_fp16():
    t = {n: x.half() for n, x in dict(q=torch.randn(1, 50, 2, 16), k=torch.randn(1, 50, 2, 16), v=torch.randn(1, 50, 2, 16)).items()}
    compare(t, dtype=torch.float16, feature_map="elu+1", **options("div", True))


@pytest.mark.parametrize("normalize", ["div", "sub", "none"])
def test_triton_strided_views(normalize):
    """q, k, v unbound from a packed qkv tensor, transposed denominators, a transposed grad_out."""
    tensors = make_inputs(B=2, H=2, N=37, M=37, Dk=16, Dv=16, Dd=8, packed=True)
    assert not any(t.is_contiguous() for t in tensors.values())
    grad_out = torch.randn(2, 2, 37, 16).transpose(1, 2)
    if normalize == "none":
        grad_out = torch.randn(16).expand(2, 37, 2, 16)  # stride 0, as from out.sum().backward()
    compare(tensors, grad_out=grad_out, **options(normalize, False))


def test_triton_wide_heads_multiple_value_tiles():
    """Dk = 200 (padded to 256, held whole) and Dv = 150 (three value tiles of 64)."""
    assert tile_config(200, 150, 40).v_tiles > 1
    for normalize in ("div", "sub"):
        tensors = make_inputs(B=1, H=1, N=20, M=33, Dk=200, Dv=150, Dd=40 if normalize == "sub" else None, weights=True)
        compare(tensors, **options(normalize, True))


def test_triton_partial_gradients_and_weight_dtypes():
    """Only some inputs need gradients; weights of other dtypes and broadcast shapes get theirs back."""
    t = make_inputs(B=2, H=2, N=30, M=26, Dk=16, Dv=16, Dd=16)
    kw = torch.rand(26, 1, dtype=torch.float64) + 0.5  # broadcasts to [B, M, H]
    vw = (torch.rand(2, 26, 1) + 0.5).half()
    results = {}
    for backend in ("triton", "torch"):
        v, k_weight, v_weight = (x.clone().requires_grad_() for x in (t["v"], kw, vw))
        out = linear_attention(t["q"], t["k"], v, q_den=t["q_den"], k_den=t["k_den"], k_weight=k_weight,
                               v_weight=v_weight, normalize="div", mean=True, backend=backend)
        out.square().sum().backward()
        results[backend] = (out, v.grad, k_weight.grad, v_weight.grad)
    got, ref = results["triton"], results["torch"]
    assert got[2].shape == kw.shape and got[2].dtype == torch.float64
    assert got[3].shape == vw.shape and got[3].dtype == torch.float16
    for a, b, tol in zip(got, ref, (1e-5, 1e-5, 1e-5, 5e-3)):
        assert rel_err(a, b) < tol


def test_triton_deterministic_and_empty_queries():
    t = make_inputs(B=1, H=2, N=300, M=300, Dk=16, Dv=16)
    a = linear_attention(t["q"], t["k"], t["v"], backend="triton")
    b = linear_attention(t["q"], t["k"], t["v"], backend="triton")
    assert torch.equal(a, b)
    q0 = t["q"][:, :0].requires_grad_()
    k = t["k"].clone().requires_grad_()
    out = linear_attention(q0, k, t["v"], backend="triton")
    assert out.shape == (1, 0, 2, 16)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))


def test_triton_fp16_long_sequence_is_finite():
    """fp16 at N = 65,536, no mean, features in [1, 2): z ≈ 10⁵ and the state ≈ 1.5·10⁵ exceed the fp16 range,
    so only the fp32 state and normaliser keep the output finite. (Forward only: 6 s interpreted; the
    backward's partial sums are the same fp32 path, checked against the reference at N ≤ 1000.)"""
    N = 65_536
    q, k, v = ((torch.rand(1, N, 1, 16) + 1.0).half() for _ in range(3))
    out = linear_attention(q, k, v, backend="triton")
    assert torch.isfinite(out).all()
    ref = linear_attention_naive(q.float(), k.float(), v.float(), None, None, None, None, "div", False, 1e-6, 1.0)
    assert rel_err(out, ref) < 5e-3


# --- Reference: gradcheck ---------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["div", "sub", "none"])
def test_reference_gradcheck(normalize):
    g = torch.Generator().manual_seed(1)
    B, N, M, H, Dk, Dv, Dd = 1, 3, 4, 2, 2, 3, 2

    def r(*shape, positive=True):
        x = torch.rand(*shape, generator=g, dtype=torch.float64)
        return (x + 0.2 if positive else x - 0.5).requires_grad_()

    inputs = (r(B, N, H, Dk), r(B, M, H, Dk), r(B, M, H, Dv, positive=False), r(B, N, H, Dd), r(B, M, H, Dd),
              r(1, M, H), r(B, M, H))

    def f(q, k, v, qd, kd, wk, wv):
        return linear_attention(q, k, v, q_den=qd, k_den=kd, k_weight=wk, v_weight=wv, backend="torch",
                                **options(normalize, True))

    assert torch.autograd.gradcheck(f, inputs)


# --- Split sizing: bounded partial buffers ----------------------------------------------------------------


def test_split_count_is_bounded_independent_of_n():
    for dk, dv in ((16, 16), (64, 64), (128, 128), (256, 256)):
        cfg = tile_config(dk, dv, dk)
        for bh in (1, 24, 4096):
            plans = {n: split_plan(n, cfg.block_t, bh, cfg.v_tiles, max(dk, dv), 132) for n in (1000, 10**6, 10**9)}
            assert plans[10**6].splits == plans[10**9].splits <= MAX_SPLITS
            for n, plan in plans.items():
                assert 1 <= plan.splits <= min(MAX_SPLITS, math.ceil(n / cfg.block_t))
                assert (plan.splits - 1) * plan.blocks_per_split < plan.blocks <= plan.splits * plan.blocks_per_split
    # fills the GPU when B·H is small, one split when B·H alone fills it
    assert split_plan(10**6, 64, 1, 1, 64, 132).splits == MAX_SPLITS
    assert split_plan(10**6, 64, 4096, 1, 64, 132).splits == 1
    small = partial_buffer_shapes(10**6, 1, 24, 128, 128, 128, "sub", 132)
    assert small == partial_buffer_shapes(10**9, 1, 24, 128, 128, 128, "sub", 132)
    assert all(shape[0] <= MAX_SPLITS for shape in small.values())


def test_backward_allocates_no_sequence_sized_fp32_buffer(monkeypatch):
    """With fp16 inputs every fp32 allocation of the backward is a partial buffer of the bounded size."""
    B, H, D, N = 1, 2, 16, 700
    t = make_inputs(B=B, H=H, N=N, M=N, Dk=D, Dv=D, Dd=8, weights=True, dtype=torch.float16)
    leaves = {n: x.detach().requires_grad_() for n, x in t.items()}
    out = linear_attention(leaves["q"], leaves["k"], leaves["v"], q_den=leaves["q_den"], k_den=leaves["k_den"],
                           k_weight=leaves["k_weight"], v_weight=leaves["v_weight"], normalize="sub", mean=True,
                           scale=0.5, backend="triton")
    allocated = []
    empty = torch.empty

    def recording_empty(*args, **kwargs):
        x = empty(*args, **kwargs)
        allocated.append((tuple(x.shape), x.dtype))
        return x

    monkeypatch.setattr(torch, "empty", recording_empty)
    out.backward(torch.randn_like(out))
    fp32 = [shape for shape, dtype in allocated if dtype == torch.float32 and shape != (B, N, H)]  # (B,N,H): dwk
    expected = partial_buffer_shapes(N, B, H, D, D, 8, "sub", 4)
    assert expected["state"][0] > 1  # several splits at this size
    assert sorted(fp32) == sorted(expected.values())
    assert all(N not in shape for shape in fp32)


# --- Validation through the public API --------------------------------------------------------------------


def test_invalid_inputs_raise():
    q, k, v = torch.rand(1, 5, 2, 4), torch.rand(1, 6, 2, 4), torch.rand(1, 6, 2, 3)
    with pytest.raises(ValueError):
        linear_attention(q[0], k, v)  # rank
    with pytest.raises(ValueError):
        linear_attention(q.half(), k, v)  # dtype mismatch
    with pytest.raises(ValueError):
        linear_attention(q.int(), k.int(), v.int())  # dtype
    with pytest.raises(ValueError):
        linear_attention(q, torch.rand(1, 6, 2, 5), v)  # Dk mismatch
    with pytest.raises(ValueError):
        linear_attention(q, k, torch.rand(1, 7, 2, 3))  # M mismatch
    with pytest.raises(ValueError):
        linear_attention(q, k[:, :0], v[:, :0])  # no keys
    with pytest.raises(ValueError):
        linear_attention(q, k, v, q_den=torch.rand(1, 5, 2, 3))  # q_den without k_den
    with pytest.raises(ValueError):
        linear_attention(q, k, v, q_den=torch.rand(1, 5, 2, 3), k_den=torch.rand(1, 6, 2, 2))  # Dd mismatch
    with pytest.raises(ValueError):
        linear_attention(q, k, v, k_weight=torch.rand(1, 7, 2))  # weight shape
    with pytest.raises(ValueError):
        linear_attention(q, k, v, normalize="softmax")
    with pytest.raises(ValueError):
        linear_attention(q, k, v, normalize="div", scale=0.5)
    with pytest.raises(ValueError):
        linear_attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError):
        linear_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError):
        linear_attention(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError):
        linear_attention(torch.rand(1, 5, 2, 300), torch.rand(1, 6, 2, 300), v, backend="triton")  # Dk > 256

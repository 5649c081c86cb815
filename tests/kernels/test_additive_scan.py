"""LightNet's additive scan: Triton (interpreted on CPU) against the PyTorch reference, and the properties
that make it itself (key-softmax permutation invariance, causal end = non-causal, stability)."""
import math

import pytest
import torch

from linvision.kernels.additive_recurrence import (
    additive_scan,
    additive_scan_naive,
    additive_scan_recurrent,
)
from linvision.kernels.additive_recurrence import triton as ast
from tests.helpers import rel_err

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def small_blocks(monkeypatch):
    """16-token blocks and no minimum split size, so N = 63 runs several blocks and several splits."""
    monkeypatch.setattr(ast, "NONCAUSAL_BLOCK_T", 16)
    monkeypatch.setattr(ast, "TOKENS_PER_SPLIT_PER_DIM", 0)


def make_inputs(B=1, N=63, H=2, Dk=24, Dv=20, dtype=torch.float32, mod=False, packed=False, key_scale=1.0):
    if packed:  # strided q, k, v views of one packed projection (no copies), as a mixer passes them
        qkv = torch.randn(B, N, 3, H, Dk, dtype=dtype)
        q, k, v = qkv.unbind(2)
        k = k * key_scale if key_scale != 1.0 else k
    else:
        q = torch.randn(B, N, H, Dk, dtype=dtype)
        k = (torch.randn(B, N, H, Dk) * key_scale).to(dtype)
        v = torch.randn(B, N, H, Dv, dtype=dtype)
    k_mod = torch.randn(1, N, H, Dk) if mod else None  # fp32, broadcast over the batch (stride 0)
    return q, k, v, k_mod


def run(backend, q, k, v, k_mod, grad, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    mod = None if k_mod is None else k_mod.detach().clone().requires_grad_()
    out = additive_scan(*leaves, k_mod=mod, backend=backend, **kw)
    out.backward(grad)
    grads = [t.grad for t in leaves] + ([] if mod is None else [mod.grad])
    return out, grads


def compare(q, k, v, k_mod, tol, **kw):
    grad = torch.randn(q.shape[:3] + v.shape[3:]).to(q.dtype)
    ref, ref_grads = run("torch", q, k, v, k_mod, grad, **kw)
    out, grads = run("triton", q, k, v, k_mod, grad, **kw)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errs) < tol, f"rel errors (o, dq, dk, dv[, dmod]) = {errs}"
    return errs


# ----------------------------------------------------------------------------------------------------------
# Triton against the reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mod", [False, True])
def test_triton_matches_reference(small_blocks, causal, dtype, mod):
    q, k, v, k_mod = make_inputs(dtype=dtype, mod=mod)
    compare(q, k, v, k_mod, TOL[dtype], causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_xmixers_lse_init_and_strided_views(small_blocks, causal):
    """lse_init = 0 (xmixers' null key) on packed [B, N, 3, H, D] views, batch 2."""
    q, k, v, k_mod = make_inputs(B=2, N=37, H=1, Dk=16, Dv=16, mod=True, packed=True)
    compare(q, k, v, k_mod, 1e-5, causal=causal, lse_init=0.0)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_fp32_output_of_half_inputs(small_blocks, causal):
    """``out_dtype=float32`` (LightNet's pre-norm result): the kernels store fp32, gradients flow back."""
    q, k, v, k_mod = make_inputs(N=40, H=1, Dk=16, Dv=16, dtype=torch.float16, mod=True)
    grad = torch.randn(q.shape[:3] + v.shape[3:])
    ref, ref_grads = run("torch", q, k, v, k_mod, grad, causal=causal, out_dtype=torch.float32)
    out, grads = run("triton", q, k, v, k_mod, grad, causal=causal, out_dtype=torch.float32)
    assert out.dtype == ref.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float16] * 3 + [torch.float32]
    errs = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads)]
    assert max(errs) < TOL[torch.float16], f"rel errors (o, dq, dk, dv, dmod) = {errs}"


def test_triton_bf16(small_blocks):
    q, k, v, _ = make_inputs(N=40, H=1, Dk=16, Dv=16, dtype=torch.bfloat16)
    compare(q, k, v, None, TOL[torch.bfloat16], causal=False)


def test_triton_several_value_tiles(monkeypatch, small_blocks):
    """Dv split over programs (forward state, query backward, causal forward), Dv = 40 in 16-wide tiles."""
    monkeypatch.setattr(ast, "_MAX_ACC", 16 * 32)
    assert ast.tile_config(24, 40).v_tiles == 3
    for causal in (False, True):
        q, k, v, k_mod = make_inputs(N=33, H=1, Dk=24, Dv=40, mod=True)
        compare(q, k, v, k_mod, 1e-5, causal=causal)


def test_split_plan_is_used_and_bounded(small_blocks):
    plan = ast.split_plan(63, 16, batch_heads=2, v_tiles=1, head_dim=24, sm_count=ast.INTERPRETER_SM_COUNT)
    assert plan.splits > 1 and plan.splits * plan.blocks_per_split >= plan.blocks


def test_partial_buffers_do_not_grow_with_n():
    shapes = [ast.partial_buffer_shapes(n, 1, 2, 64, 64, sms=132) for n in (1 << 16, 1 << 18, 1 << 22)]
    assert shapes[0] == shapes[1] == shapes[2]
    assert shapes[0][0][0] <= ast.MAX_SPLITS


# ----------------------------------------------------------------------------------------------------------
# The reference: gradcheck and the mechanism's properties
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lse_init", [-math.inf, 0.0])
def test_reference_gradcheck(causal, lse_init):
    q, k, v, k_mod = (t.double().requires_grad_() for t in make_inputs(B=1, N=11, H=2, Dk=3, Dv=2, mod=True))
    fn = lambda q, k, v, m: additive_scan(q, k, v, k_mod=m, causal=causal, lse_init=lse_init, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v, k_mod))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_noncausal_is_permutation_invariant(backend):
    """Permuting the key/value tokens leaves the output unchanged; permuting all tokens permutes it."""
    q, k, v, _ = make_inputs(N=45)
    perm = torch.randperm(45)
    out = additive_scan(q, k, v, backend=backend)
    same = additive_scan(q, k[:, perm], v[:, perm], backend=backend)
    moved = additive_scan(q[:, perm], k[:, perm], v[:, perm], backend=backend)
    assert rel_err(same, out) < 1e-6
    assert rel_err(moved, out[:, perm]) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("lse_init", [-math.inf, 0.0])
def test_causal_last_token_equals_noncausal(backend, lse_init):
    q, k, v, k_mod = make_inputs(B=2, N=50, mod=True)
    causal = additive_scan(q, k, v, k_mod=k_mod, causal=True, lse_init=lse_init, backend=backend)
    full = additive_scan(q, k, v, k_mod=k_mod, causal=False, lse_init=lse_init, backend=backend)
    assert rel_err(causal[:, -1], full[:, -1]) < 1e-6
    assert rel_err(causal[:, :-1], full[:, :-1]) > 1e-2  # earlier tokens see only a prefix


@pytest.mark.parametrize("lse_init", [-math.inf, 0.0])
def test_causal_equals_the_multiplicative_recurrence(lse_init):
    """S_t = diag(e^{z_{t−1}−z_t}) S_{t−1} + e^{f_t−z_t} κ_t v_tᵀ, token by token (LightNet's own form)."""
    q, k, v, k_mod = (t.double() for t in make_inputs(B=2, N=70, Dk=5, Dv=3, mod=True, key_scale=3.0))
    k_mod = k_mod.expand(k.shape)
    chunked = additive_scan_naive(q, k, v, k_mod, causal=True, lse_init=lse_init)
    assert rel_err(chunked, additive_scan_recurrent(q, k, v, k_mod, lse_init=lse_init)) < 1e-12


def test_noncausal_matches_the_explicit_key_softmax():
    q, k, v, k_mod = (t.double() for t in make_inputs(B=2, N=30, Dk=6, Dv=4, mod=True))
    weights = torch.softmax(k, dim=1) * k_mod  # per channel, over the tokens
    expected = torch.einsum("bnhk,bhkv->bnhv", q, torch.einsum("bnhk,bnhv->bhkv", weights, v))
    assert rel_err(additive_scan(q, k, v, k_mod=k_mod, backend="torch"), expected) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_huge_keys_stay_finite(causal, backend):
    q, k, v, k_mod = make_inputs(N=40, H=1, Dk=16, Dv=16, mod=True, key_scale=1e4)
    grad = torch.randn(1, 40, 1, 16)
    out, grads = run(backend, q, k, v, k_mod, grad, causal=causal)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    exact = additive_scan(q.double(), k.double(), v.double(), k_mod=k_mod.double(), causal=causal, backend="torch")
    assert rel_err(out, exact) < 1e-5


def test_half_precision_keys_and_long_sequence_stay_finite():
    """fp16 inputs with keys near the fp16 maximum: the fp32 log-sum-exp cannot overflow."""
    q, k, v, _ = make_inputs(N=4096, H=1, Dk=8, Dv=8, dtype=torch.float16)
    k = torch.full_like(k, 6e4)
    for causal in (False, True):
        assert torch.isfinite(additive_scan(q, k, v, causal=causal, backend="torch")).all()


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors():
    q, k, v, _ = make_inputs(N=8, Dk=16, Dv=16)
    with pytest.raises(ValueError, match="4-D"):
        additive_scan(q[0], k, v)
    with pytest.raises(ValueError, match="share a dtype"):
        additive_scan(q, k.half(), v)
    with pytest.raises(ValueError, match="shape of q"):
        additive_scan(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"\[B, N, H, Dv\]"):
        additive_scan(q, k, v[:, :4])
    with pytest.raises(ValueError, match="at least one token"):
        additive_scan(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="broadcast"):
        additive_scan(q, k, v, k_mod=torch.randn(3, 16))
    with pytest.raises(ValueError, match="k_mod"):
        additive_scan(q, k, v, k_mod=torch.ones(16, dtype=torch.long))
    with pytest.raises(ValueError, match="lse_init"):
        additive_scan(q, k, v, lse_init=math.nan)
    with pytest.raises(ValueError, match="lse_init"):
        additive_scan(q, k, v, lse_init=math.inf)
    with pytest.raises(ValueError, match="causal"):
        additive_scan(q, k, v, causal="yes")
    with pytest.raises(ValueError, match="unsupported dtype"):
        additive_scan(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="unknown backend"):
        additive_scan(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="fp64"):
        additive_scan(q.double(), k.double(), v.double(), backend="triton")
    big = torch.randn(1, 4, 1, 257)
    with pytest.raises(ValueError, match="up to 256"):
        additive_scan(big, big, big, backend="triton")

"""InfSA / Linear-InfSA operators: the spec's equations, upstream's code, golden tensors, Triton kernels."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linvision.kernels.infsa import (
    linear_infsa,
    linear_infsa_pooled,
    linear_infsa_pooled_streamed,
    linear_infsa_scores,
    pure_infsa,
    pure_infsa_scores,
)
from linvision.kernels.linear_attn import linear_attention
from tests.helpers import rel_err

GOLDEN = Path(__file__).parents[1] / "fixtures" / "infsa" / "golden.safetensors"
OPS = {"pure": pure_infsa, "pooled": linear_infsa_pooled}


def qkv(B, N, H, D, Dv=None, M=None, dtype=torch.float32, requires_grad=False):
    M = N if M is None else M
    q = torch.randn(B, N, H, D, dtype=dtype)
    k = torch.randn(B, M, H, D, dtype=dtype)
    v = torch.randn(B, M, H, Dv or D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


# ----------------------------------------------------------------------------------------------------------
# Literal restatements
# ----------------------------------------------------------------------------------------------------------


def spec_pure(q, k, v, rho, eps=1e-6):
    """spec/infsa.md, "Pure InfSA", one (batch, head) at a time, [B, N, H, D] layout."""
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype)
    d = q.shape[-1]
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            Q, K, V = q[b, :, h], k[b, :, h], v[b, :, h]
            A = torch.relu((Q / math.sqrt(d)) @ (K / math.sqrt(d)).T)
            A_hat = rho * A / (torch.sqrt((A * A).sum()) + eps)
            out[b, :, h] = A_hat @ V
    return out


def upstream_linear(q, k, v, rho, eps=1e-6):
    """infsa/core.py::linear_infsa_scores + infsa_attention(variant="linear_infsa") at 4a37fc0, restated
    line by line on (B, H, N, D) tensors; returns [B, N, H, Dv]."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    D = q.shape[-1]
    scale = math.sqrt(1.0 / D)
    q_scaled = q * scale
    k_scaled = k * scale
    energy = torch.relu(q_scaled.norm(p=2, dim=-1))
    energy_sum = energy.sum(dim=-1, keepdim=True) + eps
    weights = energy / energy_sum
    q_bar = torch.einsum("...n,...nd->...d", weights, q_scaled)
    a = torch.relu(torch.einsum("...d,...nd->...n", q_bar, k_scaled))
    a = a / (a.sum(dim=-1, keepdim=True) + eps)
    scores = (rho * a).unsqueeze(-1)
    pooled = (scores * v).sum(dim=-2, keepdim=True)
    return pooled.expand(*q.shape[:-1], v.shape[-1]).transpose(1, 2)


def test_pure_matches_the_spec_equation():
    q, k, v = qkv(2, 9, 3, 5, Dv=4, M=7, dtype=torch.float64)
    got = pure_infsa(q, k, v, rho=0.8, backend="torch")
    assert got.shape == (2, 9, 3, 4)
    assert rel_err(got, spec_pure(q, k, v, 0.8)) < 1e-12


def test_linear_matches_upstream_code():
    q, k, v = qkv(2, 9, 3, 5, Dv=4, M=7, dtype=torch.float64)
    got = linear_infsa(q, k, v, rho=0.7, backend="torch")
    assert got.shape == (2, 9, 3, 4)
    assert rel_err(got, upstream_linear(q, k, v, 0.7)) < 1e-12


def test_linear_output_is_rank_one():
    """All N output rows of Linear-InfSA are equal per head: the pooled vector, broadcast."""
    q, k, v = qkv(2, 13, 2, 8)
    o = linear_infsa(q, k, v)
    assert torch.equal(o, o[:, :1].expand_as(o))
    assert torch.equal(o[:, 0], linear_infsa_pooled(q, k, v))


@pytest.mark.parametrize("step", [1, 7, 64, 500])
def test_pooled_streamed_sums_chunks_of_rows(step):
    """Queries and keys given by range (different counts), summed over chunks of ``step`` tokens: the pooled
    vector of the whole tensors, with the gradients of q, k, v and ρ; every query and key row read once."""
    q, k, v = qkv(2, 37, 3, 8, Dv=5, M=29, dtype=torch.float64, requires_grad=True)
    rho = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    reads = {"q": 0, "k": 0}

    def rows(name, t, a, b):
        reads[name] += b - a
        return t[:, a:b]

    got = linear_infsa_pooled_streamed(lambda a, b: rows("q", q, a, b), lambda a, b: (rows("k", k, a, b), v[:, a:b]),
                                       37, 29, step=step, rho=rho, backend="torch")
    assert reads == {"q": 37, "k": 29}
    want = linear_infsa_pooled(q, k, v, rho=rho, backend="torch")
    _, _, a = linear_infsa_scores(q, k)
    spec = rho * torch.einsum("bmh,bmhd->bhd", a, v)  # the scores' form, summed over all keys at once
    assert rel_err(got, want) < 1e-13 and rel_err(got, spec) < 1e-13
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v, rho)), torch.autograd.grad(spec.sum(), (q, k, v, rho))):
        assert rel_err(g, w) < 1e-12


def test_pooled_streamed_on_triton_builds_the_rows_whole():
    q, k, v = qkv(1, 70, 2, 8, M=40)
    got = linear_infsa_pooled_streamed(lambda a, b: q[:, a:b], lambda a, b: (k[:, a:b], v[:, a:b]), 70, 40, step=16,
                                       rho=0.9, backend="triton")
    assert rel_err(got, linear_infsa_pooled(q, k, v, rho=0.9, backend="torch")) < 1e-5


@pytest.mark.golden
def test_golden_tensors_from_upstream_core():
    g = load_file(GOLDEN)
    q, k, v = (g[f"core.{n}"].transpose(1, 2) for n in "qkv")  # (B, H, N, D) → [B, N, H, D]
    rho = 0.9
    assert rel_err(pure_infsa(q, k, v, rho=rho, backend="torch"), g["core.pure_out"].transpose(1, 2)) < 1e-12
    assert rel_err(linear_infsa(q, k, v, rho=rho, backend="torch"), g["core.linear_out"].transpose(1, 2)) < 1e-12
    assert rel_err(pure_infsa_scores(q, k, rho=rho), g["core.pure_scores"]) < 1e-12
    _, _, a = linear_infsa_scores(q, k)
    assert rel_err(rho * a.transpose(1, 2), g["core.linear_scores"][..., 0]) < 1e-12
    for name, op in (("pure", pure_infsa), ("linear", linear_infsa)):  # the Triton kernels too (interpreted, fp32)
        got = op(q.float(), k.float(), v.float(), rho=rho, backend="triton")
        assert rel_err(got, g[f"core.{name}_out"].transpose(1, 2)) < 1e-6


def test_pooling_weights_and_scores():
    q, k, _ = qkv(1, 6, 2, 4, dtype=torch.float64)
    w, q_bar, a = linear_infsa_scores(q, k, eps=0.0)
    torch.testing.assert_close(w.sum(1), torch.ones(1, 2, dtype=torch.float64))
    torch.testing.assert_close(w, q.norm(dim=-1) / q.norm(dim=-1).sum(1, keepdim=True))
    torch.testing.assert_close(q_bar, torch.einsum("bnh,bnhd->bhd", w, q) / 2)
    torch.testing.assert_close(a.sum(1), torch.ones(1, 2, dtype=torch.float64))
    assert (a >= 0).all()


# ----------------------------------------------------------------------------------------------------------
# Triton kernels against the reference (interpreted on CPU)
# ----------------------------------------------------------------------------------------------------------


def grads_of(fn, tensors):
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return [out] + list(torch.autograd.grad(out, tensors, g))


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("shape", [(2, 37, 3, 20, 12, 29), (1, 130, 1, 9, 33, 70)])
def test_triton_matches_reference(op, dtype, tol, shape):
    B, N, H, D, Dv, M = shape
    tensors = qkv(B, N, H, D, Dv=Dv, M=M, dtype=dtype, requires_grad=True)
    got = grads_of(lambda *t: OPS[op](*t, rho=0.9, backend="triton"), tensors)
    want = grads_of(lambda *t: OPS[op](*(x.double() for x in t), rho=0.9, backend="torch"), tensors)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert rel_err(a, b) < tol, f"{op} {name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("op", sorted(OPS))
def test_triton_reads_strided_views(op):
    """q, k, v as views of one packed projection (no copies), several query/key blocks and splits."""
    B, N, H, D = 1, 600 if op == "pooled" else 70, 2, 16
    packed = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = packed.unbind(2)
    got = grads_of(lambda p: OPS[op](*p.unbind(2), backend="triton"), [packed])
    want = grads_of(lambda p: OPS[op](*p.unbind(2), backend="torch"), [packed])
    assert not q.is_contiguous()
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_gradcheck_float64(backend, op):
    q, k, v = qkv(1, 5, 2, 3, Dv=2, M=4, dtype=torch.float64, requires_grad=True)
    rho = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: OPS[op](*t[:3], rho=t[3], backend=backend), (q, k, v, rho))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_all_scores_negative_gives_zeros_not_nans(backend, op):
    """ReLU kills every score: the output is 0 (eps prevents 0/0) and gradients are 0, not NaN."""
    q = torch.ones(1, 5, 1, 4, requires_grad=True)
    k = (-torch.ones(1, 6, 1, 4)).requires_grad_(True)
    v = torch.randn(1, 6, 1, 3, requires_grad=True)
    out = OPS[op](q, k, v, backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(v.grad, torch.zeros_like(v.grad)) and torch.equal(k.grad, torch.zeros_like(k.grad))


# ----------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rho_tensor_receives_gradient_and_float_rho_scales(backend):
    q, k, v = qkv(1, 7, 2, 4)
    for op in OPS.values():
        rho = torch.tensor(0.5, requires_grad=True)
        out = op(q, k, v, rho=rho, backend=backend)
        out.sum().backward()
        torch.testing.assert_close(rho.grad, (out / 0.5).sum())
        torch.testing.assert_close(op(q, k, v, rho=0.25, backend=backend), out.detach() / 2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_token_variant(backend):
    """per_token: each query's own ReLU-feature attention, rows differ; equals the literal formula."""
    q, k, v = qkv(2, 11, 2, 6, Dv=5, M=8, dtype=torch.float32)
    o = linear_infsa(q, k, v, rho=0.9, per_token=True, backend=backend)
    assert not torch.allclose(o, o[:, :1].expand_as(o))
    d = q.shape[-1]
    fq, fk = torch.relu(q.double() / d**0.5), torch.relu(k.double() / d**0.5)
    s = torch.einsum("bnhd,bmhd->bhnm", fq, fk)
    want = 0.9 * torch.einsum("bhnm,bmhd->bnhd", s / (s.sum(-1, keepdim=True) + 1e-6), v.double())
    assert rel_err(o, want) < 1e-5
    ref = linear_attention(q, k, v, feature_map="relu", eps=1e-6 * d, backend="torch")
    assert rel_err(o, 0.9 * ref) < 1e-5


def test_pure_frobenius_scale_depends_on_resolution():
    """Spec pitfall: the Frobenius norm is not resolution-invariant: ‖Â‖_F = ρ at every N, row sums shrink."""
    for n in (16, 64):
        q, k, _ = qkv(1, n, 1, 8, dtype=torch.float64)
        s = pure_infsa_scores(q, k, rho=0.9)
        assert abs(s.norm().item() - 0.9) < 1e-5
        assert s.sum(-1).mean() <= 0.9 + 1e-9


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [pure_infsa, linear_infsa_pooled, linear_infsa])
def test_bad_input_raises_value_error(op):
    q, k, v = qkv(1, 4, 2, 8)
    with pytest.raises(ValueError, match="4-D"):
        op(q[0], k, v)
    with pytest.raises(ValueError, match="share a dtype"):
        op(q, k.double(), v)
    with pytest.raises(ValueError, match="k must be"):
        op(q, k[..., :4], v)
    with pytest.raises(ValueError, match="v must be"):
        op(q, k, v[:, :3])
    with pytest.raises(ValueError, match="dtype"):
        op(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="rho"):
        op(q, k, v, rho=torch.ones(2))
    with pytest.raises(ValueError, match="rho"):
        op(q, k, v, rho=float("nan"))
    with pytest.raises(ValueError, match="eps"):
        op(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        op(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="at least one"):
        op(q[:, :0], k, v)
    with pytest.raises(ValueError, match="per_token"):
        linear_infsa(q, k, v, per_token="yes")


def test_triton_rejects_oversized_head_dims():
    q, k, v = qkv(1, 4, 1, 300)
    with pytest.raises(ValueError, match="head dims"):
        pure_infsa(q, k, v, backend="triton")

"""gated_scan with DeltaProduct's ``num_householder`` steps per token against an oracle written from the paper's
equations (Siems et al. 2025, eq. of ``A(x_t) = Π_j (I − β_j k_j k_jᵀ)``; the token loop of fla's
``fla/ops/gated_delta_product/naive.py``), both directions, gradcheck, the ``n_h = 1`` special case."""
import pytest
import torch
import torch.nn.functional as F

from linvision.kernels import gated_scan
from tests.helpers import rel_err


def problem(N, n, per_channel=False, B=2, H=2, Dk=5, Dv=4, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, Dk, generator=gen, dtype=dtype)
    k = F.normalize(torch.randn(B, N * n, H, Dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(B, N * n, H, Dv, generator=gen, dtype=dtype)
    shape = (B, N, H, Dk) if per_channel else (B, N, H)
    g = F.logsigmoid(torch.randn(*shape, generator=gen, dtype=dtype) + 2)
    beta = torch.rand(B, N * n, H, generator=gen, dtype=dtype)
    return q, k, v, g, beta


def oracle(q, k, v, g, beta, n, scale, reverse=False, exclusive=False):
    """Per token ``t`` (in reverse when ``reverse``): ``S ← diag(α_t) S``; for ``j = 1 … n``:
    ``S ← (I − β_tj k_tj k_tjᵀ) S + β_tj k_tj v_tjᵀ``; ``o_t = scale·Sᵀ q_t`` after the n steps, or after the
    decay and before the first step when ``exclusive``. Explicit Householder matrices, one [Dk, Dk] at a time."""
    B, N, H, K = q.shape
    out = torch.zeros(B, N, H, v.shape[-1], dtype=q.dtype)
    g = g if g.dim() == 4 else g[..., None].expand(B, N, H, K)
    eye = torch.eye(K, dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, v.shape[-1], dtype=q.dtype)
            for t in (reversed(range(N)) if reverse else range(N)):
                S = torch.diag(g[b, t, h].exp()) @ S
                if exclusive:
                    out[b, t, h] = scale * S.T @ q[b, t, h]
                for j in range(n):
                    kj, vj, bj = k[b, t * n + j, h], v[b, t * n + j, h], beta[b, t * n + j, h]
                    S = (eye - bj * torch.outer(kj, kj)) @ S + bj * torch.outer(kj, vj)
                if not exclusive:
                    out[b, t, h] = scale * S.T @ q[b, t, h]
    return out


def scan(method, q, k, v, g, beta, n, direction="forward", **kw):
    return gated_scan(q, k, v, g, beta, delta=True, num_householder=n, direction=direction, method=method, **kw)


@pytest.mark.parametrize("N", [63, 13])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("method", ["naive", "chunked"])
def test_causal_matches_the_paper_oracle(N, n, per_channel, method):
    q, k, v, g, beta = problem(N, n, per_channel, B=1)
    ref = oracle(q, k, v, g, beta, n, scale=0.5)
    for chunk in ((5, 16) if method == "chunked" else (None,)):
        assert rel_err(scan(method, q, k, v, g, beta, n, scale=0.5, chunk_size=chunk), ref) < 1e-10


@pytest.mark.parametrize("method", ["naive", "chunked"])
def test_backward_and_bidirectional_convention(method):
    """Backward: tokens in reverse, each token's Householder steps in order; the bidirectional backward half
    reads after the decay of token t, before its first step."""
    n = 2
    q, k, v, g, beta = problem(21, n, B=1)
    gb = F.logsigmoid(torch.randn_like(g) + 1)
    fwd = oracle(q, k, v, g, beta, n, 1.0)
    bwd = oracle(q, k, v, g, beta, n, 1.0, reverse=True)
    assert rel_err(scan(method, q, k, v, g, beta, n, "backward", scale=1.0, chunk_size=4), bwd) < 1e-10
    both = scan(method, q, k, v, g, beta, n, "bidirectional", scale=1.0, chunk_size=4, g_backward=gb)
    assert rel_err(both, fwd + oracle(q, k, v, gb, beta, n, 1.0, reverse=True, exclusive=True)) < 1e-10


def test_qk_l2norm_and_neg_eigval_as_fla_layer_uses_them():
    """fla's layer: ``use_qk_l2norm_in_kernel=True`` and β doubled by ``allow_neg_eigval``."""
    n = 2
    q, k, v, g, beta = problem(17, n, B=1)
    k = k * 3.0
    out = scan("chunked", q, k, v, g, beta, n, qk_l2norm=True, allow_neg_eigval=True)
    ref = oracle(F.normalize(q, dim=-1, eps=0), F.normalize(k, dim=-1, eps=0), v, g, 2 * beta, n, 5 ** -0.5)
    assert rel_err(out, ref) < 1e-6  # fla's l2norm has eps 1e-6 inside the root


def test_one_householder_step_is_the_gated_delta_rule_and_a_zero_step_changes_nothing():
    q, k, v, g, beta = problem(30, 1)
    one = gated_scan(q, k, v, g, beta, delta=True)
    assert torch.equal(scan("chunked", q, k, v, g, beta, 1), one)
    k2 = torch.stack([k, torch.randn_like(k)], 2).flatten(1, 2)
    v2 = torch.stack([v, torch.randn_like(v)], 2).flatten(1, 2)
    b2 = torch.stack([beta, torch.zeros_like(beta)], 2).flatten(1, 2)
    for direction in ("forward", "backward", "bidirectional"):
        ref = gated_scan(q, k, v, g, beta, delta=True, direction=direction)
        assert rel_err(scan("chunked", q, k2, v2, g, b2, 2, direction), ref) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_fp32_and_fp16_against_the_fp64_oracle(dtype, tol):
    n = 2
    q, k, v, g, beta = (t.to(dtype) for t in problem(63, n, per_channel=True, B=1))
    leaves = [t.detach().requires_grad_() for t in (q, k, v, g, beta)]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out = scan("chunked", *leaves, n, "bidirectional")
    ref = scan("naive", *leaves64, n, "bidirectional")
    assert out.dtype == dtype and rel_err(out, ref) < tol
    w = torch.randn_like(ref)
    (out.float() * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in zip(leaves, leaves64):
        assert rel_err(a.grad, b.grad) < 5 * tol


@pytest.mark.parametrize("method", ["naive", "chunked"])
@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_gradcheck_float64(method, direction):
    n = 2
    q, k, v, g, beta = problem(5, n, per_channel=True, B=1, H=1, Dk=3, Dv=2)
    args = [t.requires_grad_() for t in (q, k, v, g, beta)]

    def f(*a):
        return scan(method, *a, n, direction, chunk_size=3, qk_l2norm=True)

    assert torch.autograd.gradcheck(f, args, fast_mode=True)


def test_bad_householder_arguments():
    q, k, v, g, beta = problem(6, 2)
    with pytest.raises(ValueError, match="num_householder"):
        scan("chunked", q, k, v, g, beta, 0)
    with pytest.raises(ValueError, match="num_householder"):
        scan("chunked", q, k, v, g, beta, 2.0)
    with pytest.raises(ValueError, match="N·num_householder"):
        scan("chunked", q, k, v, g, beta, 3)
    with pytest.raises(ValueError, match="beta must be"):
        scan("chunked", q, k, v, g, beta[:, :6], 2)
    with pytest.raises(ValueError, match="delta=True"):
        gated_scan(q, k, v, g, num_householder=2)

"""LightNet mixer: Triton and PyTorch paths agree, MD-LRPE is relative per axis, MD-TPE is a per-axis
Toeplitz filter, the non-causal mixer without positions is permutation-equivariant, and the causal
mixer's last token equals the non-causal one."""
import math

import pytest
import torch
import torch.nn.functional as F

import linvision
from linvision.mixers.lightnet import (
    LightNetAttention,
    MdTpe,
    decay_filter,
    grid_positions,
    md_lrpe,
    md_lrpe_angles,
    md_lrpe_theta,
)
from tests.helpers import rel_err

DIM, HEADS = 32, 2


def make(**options):
    torch.manual_seed(0)
    return linvision.create_mixer("lightnet", dim=DIM, num_heads=HEADS, **options)


def forward_backward(m, x, hw, prefix, seed=1):
    x = x.detach().clone().requires_grad_()
    m.zero_grad(set_to_none=True)
    y = m(x, hw=hw, num_prefix_tokens=prefix)
    torch.manual_seed(seed)
    y.backward(torch.randn(y.shape).to(y.dtype))
    return y, x.grad, {n: p.grad for n, p in m.named_parameters()}


def test_registered():
    assert "lightnet" in linvision.list_mixers()
    assert isinstance(make(), LightNetAttention)


@pytest.mark.parametrize(
    "hw,prefix,options",
    [
        ((7, 9), 1, {}),
        ((13, 5), 0, {"causal": True}),
        ((7, 9), 2, {"causal": True, "lrpe_learnable": True, "lse_init": 0.0}),
        ((13, 5), 1, {"lrpe_learnable": True, "gate_position": "post", "use_tpe": True}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_path_matches_torch_path(hw, prefix, options, dtype):
    """The whole mixer, forward and every gradient (input, projections, LRPE θ), on both kernel backends."""
    tol = 1e-5 if dtype == torch.float32 else 5e-3
    ref_m = make(backend="torch", **options).to(dtype)
    tri_m = make(backend="triton", **options).to(dtype)
    tri_m.load_state_dict(ref_m.state_dict())
    x = torch.randn(2, prefix + hw[0] * hw[1], DIM).to(dtype)
    y_ref, gx_ref, gp_ref = forward_backward(ref_m, x, hw, prefix)
    y, gx, gp = forward_backward(tri_m, x, hw, prefix)
    errs = {"out": rel_err(y, y_ref), "x": rel_err(gx, gx_ref)}
    # MD-TPE's q·k scale is cancelled by its RMSNorm up to eps: those gradients are ~1e-6 of the others,
    # so they are compared against the overall gradient scale rather than their own norm.
    flat = [n for n in gp_ref if n not in ("tpe.q", "tpe.k")]
    errs.update({n: rel_err(gp[n], gp_ref[n]) for n in flat})
    scale = max(gp_ref[n].float().norm().item() for n in flat)
    for n in set(gp_ref) - set(flat):
        assert torch.isfinite(gp[n]).all()
        errs[n] = (gp[n].float() - gp_ref[n].float()).norm().item() / scale
    assert max(errs.values()) < tol, errs


def test_lrpe_angles_of_a_token_range_are_the_rows_of_all():
    theta = md_lrpe_theta(HEADS, 16, ndim=2)
    whole = md_lrpe_angles(theta, (5, 7), 3, 16)  # [3 + 35, H, 16], prefix first
    for a, b in [(0, 38), (0, 2), (1, 9), (3, 10), (20, 38), (38, 38)]:
        assert torch.equal(md_lrpe_angles(theta, (5, 7), 3, 16, a, b), whole[a:b])


def test_lrpe_is_relative_per_axis():
    """q̄_s·k̄_t depends only on the per-axis differences of the two grid positions."""
    theta = md_lrpe_theta(HEADS, 16, ndim=2)
    ang = md_lrpe_angles(theta, (9, 11), 0, 16)  # [99, H, 16]
    q, k = torch.randn(1, 1, HEADS, 16).double(), torch.randn(1, 1, HEADS, 16).double()

    def score(a, b):  # positions as (row, col)
        qa = md_lrpe(q, ang[a[0] * 11 + a[1]].double()[None, None])
        kb = md_lrpe(k, ang[b[0] * 11 + b[1]].double()[None, None])
        return (qa * kb).sum(-1)

    base = score((1, 2), (4, 7))
    assert torch.allclose(score((5, 3), (8, 8)), base, atol=1e-5)  # same (Δr, Δc) = (3, 5)
    assert not torch.allclose(score((1, 2), (4, 8)), base, atol=1e-3)


def test_lrpe_angles_layout_and_prefix_tokens():
    """Channel chunk 0 carries the row, chunk 1 the column (xopes), truncated to d; prefix tokens at angle 0."""
    d = 10  # odd per-axis chunk: e = 5
    theta = md_lrpe_theta(3, d, ndim=2)
    ang = md_lrpe_angles(theta, (4, 6), 2, d)
    assert ang.shape == (2 + 24, 3, d)
    assert torch.equal(ang[:2], torch.zeros(2, 3, d))
    r, c = 2, 5
    expected = torch.cat([r * theta, c * theta], -1)[:, :d]
    torch.testing.assert_close(ang[2 + r * 6 + c], expected)
    x = torch.randn(1, 26, 3, d)
    xb = md_lrpe(x, ang)
    torch.testing.assert_close(xb[:, :2], torch.cat([x[:, :2], torch.zeros_like(x[:, :2])], -1))
    assert torch.equal(grid_positions((2, 3)), torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]))


def test_lrpe_frequencies():
    per_head = md_lrpe_theta(2, 8, ndim=2, base=10000.0)  # H·d = 16 frequencies, 4 per head used
    all_freqs = 10000.0 ** (-2 * torch.arange(16, dtype=torch.float64) / 16)
    torch.testing.assert_close(per_head, all_freqs.view(2, 8)[:, :4].float())
    shared = md_lrpe_theta(2, 8, ndim=2, layout="shared")
    torch.testing.assert_close(shared[0], shared[1])


def test_noncausal_without_positions_is_permutation_equivariant():
    """No LRPE/TPE: permuting the tokens permutes the output (the key-softmax ignores scan order)."""
    m = make(use_lrpe=False)
    x = torch.randn(2, 7 * 9, DIM)
    perm = torch.randperm(63)
    y = m(x, hw=(7, 9))
    torch.testing.assert_close(m(x[:, perm], hw=(7, 9)), y[:, perm], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_causal_last_token_equals_noncausal(backend):
    x = torch.randn(2, 1 + 5 * 6, DIM)
    causal = make(causal=True, backend=backend)
    full = make(causal=False, backend=backend)
    full.load_state_dict(causal.state_dict())
    yc, yf = causal(x, hw=(5, 6), num_prefix_tokens=1), full(x, hw=(5, 6), num_prefix_tokens=1)
    assert rel_err(yc[:, -1], yf[:, -1]) < 1e-5
    assert rel_err(yc[:, 0], yf[:, 0]) > 1e-2


def test_causal_mixer_ignores_the_future():
    m = make(causal=True)
    x = torch.randn(1, 6 * 7, DIM)
    y = m(x, hw=(6, 7))
    x2 = x.clone()
    x2[:, 30:] = torch.randn(1, 12, DIM)
    torch.testing.assert_close(m(x2, hw=(6, 7))[:, :30], y[:, :30])


@pytest.mark.parametrize("direction", ["bidirectional", "causal"])
def test_md_tpe_is_a_per_axis_toeplitz_filter(direction):
    """Against an explicit double loop: y = Σ_axes o_proj(RMSNorm_h((q·k)_h Σ_s λ_h^{|t−s|} x_s along the axis))."""
    torch.manual_seed(0)
    tpe = MdTpe(DIM, HEADS, direction=direction).double()
    h, w, P = 4, 5, 1
    x = torch.randn(2, P + h * w, DIM, dtype=torch.float64)
    y = tpe(x, (h, w), P)
    assert torch.equal(y[:, :P], torch.zeros_like(y[:, :P]))
    grid = x[:, P:].reshape(2, h, w, HEADS, DIM // HEADS)
    expected = torch.zeros(2, h, w, DIM, dtype=torch.float64)
    for a, L in enumerate((h, w)):
        lam = torch.sigmoid(tpe.log_decay[a])
        qk = (tpe.q[a] * tpe.k[a]).view(HEADS, -1).sum(-1)
        filt = torch.zeros_like(grid)
        for i in range(L):
            for j in range(L):
                if direction == "causal" and j > i:
                    continue
                wgt = (lam ** abs(i - j) * qk)[:, None]
                if a == 0:
                    filt[:, i] += wgt * grid[:, j]
                else:
                    filt[:, :, i] += wgt * grid[:, :, j]
        normed = filt * torch.rsqrt(filt.square().mean(-1, keepdim=True) + tpe.eps)
        normed = normed * tpe.norm_weight[a].view(HEADS, -1)
        expected += tpe.o_proj[a](normed.reshape(2, h, w, DIM))
    torch.testing.assert_close(y[:, P:], expected.reshape(2, h * w, DIM))


def dense_decay_filter(g, log_decay, causal):
    """The full decay matrix ``λ^{|i−j|}`` (causal: ``j ≤ i``) applied along the last dim of ``g [..., H, d, L]``."""
    L = g.shape[-1]
    dist = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    mat = torch.exp(dist.abs().to(g.dtype) * log_decay[:, None, None])
    if causal:
        mat = mat.masked_fill(dist < 0, 0.0)
    return torch.einsum("hij,...hdj->...hdi", mat, g)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L, chunk", [(7, 2), (9, 4), (12, 3), (5, 32)])
def test_decay_filter_matches_the_toeplitz_matrix(causal, L, chunk):
    """The chunked filter (carried states across chunks, a partial last chunk) against the full decay matrix,
    values and gradients; gradcheck in float64. MdTpe.toeplitz is that matrix."""
    torch.manual_seed(0)
    g = torch.randn(2, 3, HEADS, DIM // HEADS, L, dtype=torch.float64, requires_grad=True)
    log_decay = F.logsigmoid(torch.randn(HEADS, dtype=torch.float64)).requires_grad_()
    got, want = decay_filter(g, log_decay, causal, chunk), dense_decay_filter(g, log_decay, causal)
    assert rel_err(got, want) < 1e-12
    probe = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (g, log_decay), probe), torch.autograd.grad(want, (g, log_decay), probe)):
        assert rel_err(a, b) < 1e-12
    assert torch.autograd.gradcheck(lambda g, ld: decay_filter(g, ld, causal, chunk), (g[:1, :1], log_decay))
    tpe = MdTpe(DIM, HEADS, direction="causal" if causal else "bidirectional").double()
    with torch.no_grad():
        tpe.log_decay[0] = torch.logit(log_decay.exp())
    assert rel_err(torch.einsum("hij,...hdj->...hdi", tpe.toeplitz(0, L, torch.float64), g), want) < 1e-12


def test_tpe_replace_keeps_prefix_tokens_and_any_resolution():
    m = make(use_tpe=True, tpe_mode="replace")
    for hw, prefix in (((3, 4), 1), ((8, 2), 0), ((5, 5), 3)):
        y = m(torch.randn(1, prefix + hw[0] * hw[1], DIM), hw=hw, num_prefix_tokens=prefix)
        assert y.shape == (1, prefix + hw[0] * hw[1], DIM) and torch.isfinite(y).all()
    assert make(use_tpe=True).tpe.direction == "bidirectional"
    assert make(use_tpe=True, causal=True).tpe.direction == "causal"


def test_huge_activations_stay_finite():
    """Keys of magnitude ~1e4 (a large input): the fp32 log-sum-exp normaliser keeps outputs finite."""
    for causal in (False, True):
        m = make(causal=causal)
        y = m(torch.randn(1, 1 + 4 * 5, DIM) * 1e4, hw=(4, 5), num_prefix_tokens=1)
        assert torch.isfinite(y).all()


def test_bad_options_raise_value_errors():
    for bad in (
        {"gate_position": "middle"},
        {"lrpe_theta": "random"},
        {"q_activation": "gelu"},
        {"tpe_mode": "mul"},
        {"tpe_direction": "up"},
        {"backend": "cuda"},
        {"lse_init": math.inf},
        {"lse_init": math.nan},
        {"lrpe_base": 0.0},
        {"gate_rank": 0},
    ):
        with pytest.raises(ValueError):
            make(**bad)

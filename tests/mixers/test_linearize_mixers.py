"""Hedgehog, LoLCATs and Liger: official parity (fixtures), oracles, window predicates, option checks."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import linvision
from linvision.kernels.window_attn.naive import window_mask
from linvision.mixers.hedgehog import HedgehogFeatureMap, normalised_rows
from linvision.kernels.gated_recurrence import gated_scan
from linvision.mixers.liger import gated_rows, liger_gates
from linvision.kernels.linear_attn import naive as linear_naive
from linvision.mixers import lolcats
from linvision.mixers.lolcats import hybrid_attention, hybrid_rows
from linvision.mixers.window2d import shifted, window_offsets, window_rows

FIXTURES = Path(__file__).parents[1] / "fixtures"
FIXTURE = FIXTURES / "linearize" / "official.safetensors"


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.fixture(scope="module")
def official():
    return load_file(str(FIXTURE))


@pytest.mark.parametrize("form,key", [("softmax", "lolcats_softmax_dim"), ("exp", "lolcats_exp_dim")])
def test_feature_map_matches_lolcats(official, form, key):
    x = official["x"]  # [B, H, L, D]
    H, D = x.shape[1], x.shape[3]
    fmap = HedgehogFeatureMap(H, D, form=form, bias=False)
    with torch.no_grad():
        fmap.weight.copy_(official["lolcats_weight"])
    out = fmap(x.transpose(1, 2)).transpose(1, 2)
    assert rel(out, official[key]) < 1e-6


def test_feature_map_matches_fla(official):
    x = official["x"]
    H, D = x.shape[1], x.shape[3]
    fmap = HedgehogFeatureMap(H, D, form="joint")
    with torch.no_grad():
        fmap.weight.copy_(official["fla_weight"].t().expand(H, D, D))
        fmap.bias.copy_(official["fla_bias"].expand(H, D))
    out = fmap(x.transpose(1, 2)).transpose(1, 2)
    assert rel(out, official["fla_out"]) < 1e-6


def test_feature_map_starts_at_identity():
    fmap = HedgehogFeatureMap(2, 4, feature_dim=6)
    assert torch.equal(fmap.weight[1], torch.eye(4, 6)) and torch.equal(fmap.bias, torch.zeros(2, 6))
    y = fmap(torch.randn(1, 5, 2, 4))
    assert y.shape == (1, 5, 2, 12) and (y > 0).all()


@pytest.mark.parametrize("shape", ["disc", "square"])
def test_hybrid_attention_matches_lolcats(official, shape):
    f = {n: official[f"hybrid_{shape}_{n}"] for n in ("q", "k", "v", "fq", "fk", "wf", "y", "a")}
    q, k, v, fq, fk = (f[n].transpose(1, 2) for n in ("q", "k", "v", "fq", "fk"))  # → [B, N, H, D]
    wf = f["wf"].flatten()
    hw, T, r = (4, 5), 1, 2
    y = hybrid_attention(q, k, v, fq, fk, hw, T, wf, 1.0, shape, r)
    assert rel(y.transpose(1, 2), f["y"]) < 1e-5
    a = hybrid_rows(q, k, fq, fk, hw, T, wf, 1.0, shape, r, 0, q.shape[1])
    assert rel(a, f["a"]) < 1e-5


@pytest.mark.parametrize("shape", ["disc", "square"])
@pytest.mark.parametrize("T", [0, 2])
def test_hybrid_attention_equals_dense_rows_fp64(shape, T):
    """Shifted-view path against the dense masked rows, at hw = (7, 9), per-head affine factors."""
    torch.manual_seed(1)
    B, H, D, F, hw = 2, 3, 4, 5, (7, 9)
    N = T + hw[0] * hw[1]
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3))
    fq, fk = (torch.rand(B, N, H, F, dtype=torch.float64) for _ in range(2))
    wf = torch.rand(H, dtype=torch.float64)
    for lf in (1.0, 1 - wf):
        y = hybrid_attention(q, k, v, fq, fk, hw, T, wf, lf, shape, 3)
        ref = torch.einsum("bhnm,bmhv->bnhv", hybrid_rows(q, k, fq, fk, hw, T, wf, lf, shape, 3, 0, N), v)
        assert rel(y, ref) < 1e-12


@pytest.mark.parametrize("rows", [(0, 7), (0, 1), (2, 5), (6, 7), (3, 4)])
def test_shifted_band_is_the_band_of_the_whole_grid(rows):
    """``shifted(rows=(a, b))`` equals rows a:b of the whole-grid views (values and validity), near either edge."""
    t = torch.randn(2, 63, 3, 4)
    offsets = window_offsets("disc", 3)
    a, b = rows
    for (whole, ok), (band, band_ok) in zip(shifted(t, (7, 9), offsets), shifted(t, (7, 9), offsets, rows)):
        assert torch.equal(band, whole[:, a:b]) and torch.equal(band_ok, ok[a:b])


@pytest.mark.parametrize("T", [0, 2])
def test_hybrid_attention_bands_and_epilogue(monkeypatch, T):
    """Bands of two grid rows, rotated numerator features, and the ``output`` epilogue: every range once, in
    order, against the dense rows, with gradients."""
    monkeypatch.setattr(lolcats, "BAND_TOKENS", 18)
    monkeypatch.setattr(linear_naive, "CHUNK_ELEMENTS", 1)  # the key state summed over 64-token chunks
    torch.manual_seed(3)
    B, H, D, F, hw = 2, 3, 4, 5, (11, 9)  # 99 image keys: two chunks of the state
    N = T + 99
    q, k, v = (torch.randn(B, N, H, D, dtype=torch.float64) for _ in range(3))
    fq, fk, rfq, rfk = (torch.rand(B, N, H, F, dtype=torch.float64) for _ in range(4))
    wf = torch.rand(H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(H * D, 2, dtype=torch.float64)
    seen = []

    def output(a, b, o):
        seen.append((a, b))
        return o.flatten(2) @ weight

    y = hybrid_attention(q, k, v, fq, fk, hw, T, wf, 1 - wf, "disc", 3, rfq, rfk, output=output)
    assert seen == ([(0, T)] if T else []) + [(T + 9 * a, T + 9 * min(a + 2, 11)) for a in range(0, 11, 2)]
    rows = hybrid_rows(q, k, fq, fk, hw, T, wf, 1 - wf, "disc", 3, 0, N, rfq, rfk)
    ref = torch.einsum("bhnm,bmhv->bnhv", rows, v).flatten(2) @ weight
    assert rel(y, ref) < 1e-12
    assert rel(torch.autograd.grad(y.sum(), wf)[0], torch.autograd.grad(ref.sum(), wf)[0]) < 1e-12


def test_hybrid_attention_gradcheck():
    torch.manual_seed(2)
    hw, T = (2, 3), 1
    N = T + 6
    q, k, v = (torch.randn(1, N, 1, 2, dtype=torch.float64) for _ in range(3))
    fq, fk = (torch.rand(1, N, 1, 3, dtype=torch.float64) for _ in range(2))
    q.requires_grad_(), fk.requires_grad_()
    wf = torch.rand(1, dtype=torch.float64, requires_grad=True)
    fn = lambda q, fk, wf: hybrid_attention(q, k, v, fq, fk, hw, T, wf, 1 - wf, "disc", 2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, fk, wf))


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_disc_window_is_clears(radius):
    hw, T = (5, 6), 2
    N = T + 30
    assert torch.equal(window_rows(hw, T, "disc", radius, 0, N), window_mask(hw, radius, T))
    square = window_rows(hw, T, "square", radius, 3, N)
    assert int(square[-1, T:].sum()) == min(radius, 5) * min(radius, 6)  # corner token (4, 5)


def test_hedgehog_mixer_equals_its_rows():
    torch.manual_seed(3)
    m = linvision.create_mixer("hedgehog", 16, 2).double()
    x = torch.randn(2, 1 + 63, 16, dtype=torch.float64)
    q, k, rows = m.attention_rows(x, (7, 9), 1)
    _, _, v = m.project_qkv(x)
    ref = m.proj(torch.einsum("bhnm,bmhv->bnhv", rows(0, 64), v).flatten(2))
    assert rel(m(x, (7, 9), 1), ref) < 1e-10


@pytest.mark.parametrize("mix,order", [(0.0, "raster"), (0.5, "raster"), (0.0, "column"), (0.5, "cross")])
def test_liger_mixer_equals_its_rows(mix, order):
    """The bidirectional gated scans in 2-D orders equal the dense weights of attention_rows."""
    torch.manual_seed(4)
    m = linvision.create_mixer("liger", 16, 2, radius=2, window_mix=mix, order=order).double()
    x = torch.randn(2, 1 + 63, 16, dtype=torch.float64)
    q, k, rows = m.attention_rows(x, (7, 9), 1)
    _, _, v = m.project_qkv(x)
    ref = m.proj(torch.einsum("bhnm,bmhv->bnhv", rows(0, 64), v).flatten(2))
    assert rel(m(x, (7, 9), 1), ref) < 1e-10
    assert rel(torch.cat([rows(0, 30), rows(30, 64)], 2), rows(0, 64)) < 1e-13  # rows chunk freely
    assert sum(p.numel() for p in m.parameters()) == 16 * 48 + 48 + 16 * 16 + 16  # q/k/v/proj only


def test_liger_rows_decay_with_scan_distance():
    """Raster order, no prefix: the weight of a key is Σ_d φ(q)_d φ(k)_d Π (gates between them)."""
    torch.manual_seed(5)
    m = linvision.create_mixer("liger", 16, 2, window_mix=0.0).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    q, k, rows = m.attention_rows(x, (3, 4), 0)
    fq, fk, g = liger_gates(q, k, 16.0)
    a = rows(0, 12)
    for i, j in [(7, 2), (2, 7), (5, 5), (0, 11)]:
        lo, hi = min(i, j), max(i, j)
        decay = g[0, lo + 1:hi + 1].sum(0) if j <= i else g[0, lo:hi].sum(0)  # fwd: gates j+1..i; bwd: i..j-1
        want = (fq[0, i] * fk[0, j] * decay.exp()).sum(-1)
        assert rel(a[0, :, i, j], want) < 1e-12


def test_liger_rows_gradcheck():
    torch.manual_seed(6)
    fq, fk = (torch.rand(1, 7, 1, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    g = (-torch.rand(1, 7, 1, 3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: gated_rows(a, b, c, (2, 3), 1, "cross", 2, 6), (fq, fk, g))


def test_liger_gates_are_the_official_ones():
    k = torch.randn(1, 5, 2, 4)
    fq, fk, g = liger_gates(k, k, 16.0)
    assert rel(g.exp(), torch.sigmoid(k) ** (1 / 16)) < 1e-6
    assert rel(fk, k.softmax(-1)) < 1e-6 and rel(fq.sum(-1), torch.ones(1, 5, 2)) < 1e-6


def test_liger_causal_gla_matches_official():
    """The official GLA branch ``o_`` (fixture) from the mixer's projections, gates and a forward gated scan."""
    f = load_file(str(FIXTURES / "liger" / "official.safetensors"))
    m = linvision.create_mixer("liger", 16, 2, qkv_bias=False)
    with torch.no_grad():
        m.qkv.weight.copy_(torch.cat([f["q_weight"], f["k_weight"], f["v_weight"]]))
    q, k, v = m.project_qkv(f["x"])
    fq, fk, g = liger_gates(q, k, m.gate_normalizer)
    o = gated_scan(fq, fk, v, g, direction="forward", scale=1.0)
    assert rel(o, f["o"]) < 1e-5


@pytest.mark.parametrize("name,bad", [
    ("hedgehog", {"form": "relu"}), ("hedgehog", {"feature_dim": 0}), ("hedgehog", {"eps": -1.0}),
    ("hedgehog", {"feature_bias": "yes"}), ("lolcats", {"feature_dim": 2.5}),
    ("lolcats", {"window": "circle"}), ("lolcats", {"radius": 0}), ("lolcats", {"radius": 2.0}),
    ("lolcats", {"affine_factors": 1}), ("lolcats", {"init_window_factor": float("nan")}),
    ("liger", {"window_mix": 1.5}), ("liger", {"gate_normalizer": 0.0}), ("liger", {"radius": True}),
    ("liger", {"order": "diagonal"}),
])
def test_bad_options_raise(name, bad):
    with pytest.raises(ValueError):
        linvision.create_mixer(name, 16, 2, **bad)


@pytest.mark.parametrize("affine", [False, True])
def test_lolcats_window_factors_are_fp64_in_an_fp64_module(affine):
    """σ(window_factors) was taken in fp32 whatever the module's dtype."""
    m = linvision.create_mixer("lolcats", 8, 2, affine_factors=affine).double()
    wf, lf = m.factors()
    assert wf.dtype == torch.float64 and (not affine or lf.dtype == torch.float64)

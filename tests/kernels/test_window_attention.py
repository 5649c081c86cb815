"""Circular-window attention (CLEAR): the oracle, the blocked reference and the Triton kernels (interpreted on CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

from linvision.kernels.window_attn import (
    key_tiles_per_query_tile,
    pool_tokens,
    window_attention,
    window_attention_blocked,
    window_attention_dense,
    window_mask,
)
from linvision.kernels.window_attn.tiles import reach_table, visited_key_tiles
from linvision.kernels.window_attn.triton import visited_tile_counts
from tests.helpers import rel_err

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def mask_by_loops(hw, r, T=0, P=0):
    """The CLEAR support written out token by token (independent of ``window_mask``)."""
    h, w = hw
    n = T + h * w
    m = torch.zeros(n, n + P, dtype=torch.bool)
    for i in range(n):
        for j in range(n + P):
            if i < T:
                m[i, j] = j < n
            elif j < T or j >= n:
                m[i, j] = True
            else:
                (yi, xi), (yj, xj) = divmod(i - T, w), divmod(j - T, w)
                m[i, j] = (yi - yj) ** 2 + (xi - xj) ** 2 < r * r
    return m


def masked_softmax(q, k, v, mask, scale):
    """Dense softmax attention in fp64 with an explicit boolean mask, through SDPA's layout."""
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def make(B, hw, H, Dk, Dv=None, T=0, P=0, dtype=torch.float32, grad=True):
    N = T + hw[0] * hw[1]
    Dv = Dv or Dk
    ts = [torch.randn(B, N, H, Dk), torch.randn(B, N, H, Dk), torch.randn(B, N, H, Dv)]
    if P:
        ts += [torch.randn(B, P, H, Dk), torch.randn(B, P, H, Dv)]
    return [t.to(dtype).requires_grad_(grad) for t in ts]


def call(ts, hw, r, T, backend, **kw):
    q, k, v, *pooled = ts
    pk, pv = pooled if pooled else (None, None)
    return window_attention(q, k, v, hw, radius=r, num_prefix_tokens=T, pooled_k=pk, pooled_v=pv, backend=backend, **kw)


def value_and_grads(fn, ts, seed=1):
    out = fn(ts)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return [out] + list(torch.autograd.grad(out, ts, g))


# ---------------------------------------------------------------------------------------------------------
# The support and the oracle
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw,r,T,P", [((4, 5), 2, 0, 0), ((3, 7), 3, 2, 4), ((5, 5), 1, 1, 0), ((2, 3), 9, 3, 2)])
def test_mask_is_the_clear_predicate(hw, r, T, P):
    assert torch.equal(window_mask(hw, r, T, P), mask_by_loops(hw, r, T, P))


def test_disc_sizes_match_the_spec():
    """Interior image keys per query: 193 (r = 8), 793 (r = 16): a strict disc, not a square."""
    for r, n in ((8, 193), (16, 793)):
        m = window_mask((2 * r + 1, 2 * r + 1), r)
        assert m[(2 * r + 1) * r + r].sum().item() == n


@pytest.mark.parametrize("hw,r,T,P", [((5, 7), 3, 0, 0), ((4, 6), 2, 3, 5)])
def test_oracle_is_masked_softmax(hw, r, T, P):
    q, k, v, *pooled = make(2, hw, 3, 8, 6, T, P, torch.float64, grad=False)
    want_k = torch.cat([k] + pooled[:1], 1)
    want_v = torch.cat([v] + pooled[1:], 1)
    want = masked_softmax(q, want_k, want_v, mask_by_loops(hw, r, T, P), 0.3)
    got = window_attention_dense(q, k, v, hw, r, T, *(pooled or [None, None]), 0.3)
    assert rel_err(got, want) < 1e-12


def test_radius_one_returns_v_and_a_huge_radius_is_full_softmax():
    q, k, v = make(1, (4, 6), 2, 8, grad=False)
    for backend in ("torch", "triton"):
        assert rel_err(window_attention(q, k, v, (4, 6), radius=1, backend=backend), v) < 1e-6
        full = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        assert rel_err(window_attention(q, k, v, (4, 6), radius=8, backend=backend), full) < 1e-5


@pytest.mark.parametrize("pooled", [False, True])
def test_matches_flex_attention_with_the_official_mask_mod(pooled):
    """CLEAR's own path: FlexAttention (eager, CPU) with the official predicates of ``init_local_mask_flex`` /
    ``init_local_downsample_mask_flex`` and the official pooling expression (``unflatten · spatial_weight``)."""
    import warnings

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    h, w, T, r, f, H, D = 8, 12, 5, 3, 4, 2, 16
    N = T + h * w

    def local_mask(b, hh, q_idx, kv_idx):
        q_y, q_x = (q_idx - T) // w, (q_idx - T) % w
        kv_y, kv_x = (kv_idx - T) // w, (kv_idx - T) % w
        return torch.logical_or(torch.logical_or(q_idx < T, kv_idx < T), (q_y - kv_y) ** 2 + (q_x - kv_x) ** 2 < r**2)

    def local_downsample_mask(b, hh, q_idx, kv_idx):
        q_y, q_x = (q_idx - T) // w, (q_idx - T) % w
        kv_y, kv_x = (kv_idx - T) // w, (kv_idx - T) % w
        return torch.logical_or(
            torch.logical_and(q_idx < T, kv_idx < T + h * w),
            torch.logical_and(
                q_idx >= T,
                torch.logical_or(
                    torch.logical_or(kv_idx < T, kv_idx >= T + h * w), (q_y - kv_y) ** 2 + (q_x - kv_x) ** 2 < r**2
                ),
            ),
        )

    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))  # the official [B, H, S, D] layout
    weight = torch.rand(1, 1, 1, f, 1, f, 1)
    P = (h // f) * (w // f) if pooled else 0
    if pooled:
        k_ds = (k[:, :, T:].unflatten(2, (h // f, f, w // f, f)) * weight).sum(dim=(3, 5)).flatten(2, 3)
        v_ds = (v[:, :, T:].unflatten(2, (h // f, f, w // f, f)) * weight).sum(dim=(3, 5)).flatten(2, 3)
        k_all, v_all = torch.cat([k, k_ds], 2), torch.cat([v, v_ds], 2)
    else:
        k_all, v_all = k, v
    mask = create_block_mask(local_downsample_mask if pooled else local_mask, None, None, N, N + P, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is not compiled
        want = flex_attention(q, k_all, v_all, block_mask=mask, scale=0.3).transpose(1, 2)

    Q, K, V = (t.transpose(1, 2) for t in (q, k, v))
    pk, pv = (pool_tokens(t, (h, w), f, weight, T) for t in (K, V)) if pooled else (None, None)
    for backend in ("torch", "triton"):
        got = window_attention(Q, K, V, (h, w), radius=r, num_prefix_tokens=T, pooled_k=pk, pooled_v=pv, scale=0.3,
                               backend=backend)
        assert rel_err(got, want) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# The blocked PyTorch reference (the CPU backend)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw,r,T,P,block", [
    ((7, 9), 3, 0, 0, None), ((13, 5), 4, 3, 5, 4), ((6, 8), 2, 1, 2, 3), ((3, 4), 7, 2, 0, None), ((9, 9), 5, 0, 3, 8),
])
def test_blocked_reference_matches_oracle_with_gradients(hw, r, T, P, block):
    ts = make(2, hw, 2, 8, 5, T, P, torch.float64)
    pooled = lambda t: (t[3], t[4]) if P else (None, None)  # noqa: E731
    got = value_and_grads(lambda t: window_attention_blocked(*t[:3], hw, r, T, *pooled(t), 0.4, block=block), ts)
    want = value_and_grads(lambda t: window_attention_dense(*t[:3], hw, r, T, *pooled(t), 0.4), ts)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("T", [0, 3])
def test_blocked_bands_and_epilogue_match_oracle(monkeypatch, T):
    """One block row per band (each pads only the key rows it reaches) and one block per score chunk (the band's
    columns split), one prefix query per chunk, and the
    ``output`` epilogue called once per range with its rows, in order, with gradients."""
    from linvision.kernels.window_attn import naive

    monkeypatch.setattr(naive, "BLOCK_SCORE_ELEMENTS", 1)
    monkeypatch.setattr(naive, "SCORE_ELEMENTS", 1)
    hw, r, scale = (11, 7), 3, 0.5
    ts = make(2, hw, 2, 4, 5, T, 0, torch.float64)
    weight = torch.randn(2 * 5, 3, dtype=torch.float64)
    ranges = [(a, a + 1) for a in range(T)] + [(T + y * 7, T + min(y + 2, 11) * 7) for y in range(0, 11, 2)]
    starts = torch.tensor([a for a, b in ranges for _ in range(a, b)], dtype=torch.float64)[None, :, None]
    seen = []

    def output(a, b, o):  # token-wise, and telling the ranges apart
        seen.append((a, b))
        return o.flatten(2) @ weight + a

    got = value_and_grads(lambda t: window_attention_blocked(*t, hw, r, T, None, None, scale, block=2,
                                                             output=output), ts)
    assert seen == ranges
    want = value_and_grads(lambda t: window_attention_dense(*t, hw, r, T, None, None, scale).flatten(2) @ weight
                           + starts, ts)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12
    plain = window_attention(*ts, hw, radius=r, num_prefix_tokens=T, scale=scale, backend="torch")
    assert rel_err(plain, window_attention_dense(*ts, hw, r, T, None, None, scale)) < 1e-12


def test_gradcheck_float64_references():
    hw, r, T = (2, 3), 2, 1
    ts = make(1, hw, 1, 3, 2, T, 2, torch.float64)
    dense = lambda q, k, v, pk, pv: window_attention_dense(q, k, v, hw, r, T, pk, pv, 0.5)  # noqa: E731
    blocked = lambda q, k, v, pk, pv: window_attention_blocked(q, k, v, hw, r, T, pk, pv, 0.5, block=2)  # noqa: E731
    assert torch.autograd.gradcheck(dense, ts)
    assert torch.autograd.gradcheck(blocked, ts)


# ---------------------------------------------------------------------------------------------------------
# Triton (interpreted) against the oracle
# ---------------------------------------------------------------------------------------------------------

CASES = [
    # B, hw, H, Dk, Dv, T, P, r
    (1, (7, 9), 2, 16, 16, 0, 0, 3),
    (1, (13, 5), 1, 24, 40, 3, 5, 4),
    (2, (5, 4), 1, 16, 8, 2, 0, 2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,hw,H,Dk,Dv,T,P,r", CASES)
def test_triton_matches_oracle(B, hw, H, Dk, Dv, T, P, r, dtype):
    ts = make(B, hw, H, Dk, Dv, T, P, dtype)
    got = value_and_grads(lambda t: call(t, hw, r, T, "triton"), ts)
    scale = 1.0 / math.sqrt(Dk)

    def oracle(t):
        q, k, v, *pooled = [x.float() for x in t]
        return window_attention_dense(q, k, v, hw, r, T, *(pooled or [None, None]), scale).to(dtype)

    want = value_and_grads(oracle, ts)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dpk", "dpv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < TOL[dtype], (name, rel_err(a, b))


def test_triton_with_pooled_tokens_from_pool_tokens_and_bf16():
    """Pooled K/V built by ``pool_tokens`` (gradients flow through the pooling); bf16 takes fp32 dots."""
    hw, T, f, r = (8, 6), 2, 2, 2
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = make(1, hw, 2, 16, 16, T, 0, dtype)
        weight = torch.rand(f, f, dtype=dtype, requires_grad=True)

        def fn(ts, backend):
            q, k, v, wt = ts
            pk, pv = (pool_tokens(t, hw, f, wt, T) for t in (k, v))
            if backend == "torch":
                q, k, v, pk, pv = (t.float() for t in (q, k, v, pk, pv))
            out = window_attention(q, k, v, hw, radius=r, num_prefix_tokens=T, pooled_k=pk, pooled_v=pv, backend=backend)
            return out.to(dtype)

        got = value_and_grads(lambda t: fn(t, "triton"), [q, k, v, weight])
        want = value_and_grads(lambda t: fn(t, "torch"), [q, k, v, weight])
        for a, b in zip(got, want):
            assert rel_err(a, b) < TOL[dtype]


def test_triton_reads_strided_views_and_any_tile_shape():
    """q, k, v as views of one packed projection (no copies); non-square tiles."""
    from linvision.kernels.window_attn.triton import window_attention_triton

    B, hw, H, D, T, r = 1, (7, 9), 2, 16, 1, 3
    N = T + hw[0] * hw[1]
    qkv = torch.randn(B, N, 3, H, D, requires_grad=True)
    q, k, v = qkv.unbind(2)
    want = value_and_grads(lambda t: window_attention_dense(*t[0].unbind(2), hw, r, T, None, None, 0.25), [qkv])
    for tiles in (((2, 8), (8, 2)), ((4, 4), (2, 8))):
        got = value_and_grads(
            lambda t: window_attention_triton(*t[0].unbind(2), hw, r, T, None, None, 0.25, tiles=tiles), [qkv]
        )
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-5


# ---------------------------------------------------------------------------------------------------------
# Cost: visited key tiles
# ---------------------------------------------------------------------------------------------------------


def test_kernel_visits_the_tiles_the_host_mirror_predicts():
    for hw in ((9, 9), (17, 21)):
        q = torch.randn(1, hw[0] * hw[1], 1, 16)
        counts = visited_tile_counts(q, q, q, hw, 5, tiles=((4, 4), (4, 4)))
        assert counts[0].tolist() == visited_key_tiles(hw, 5, (4, 4), (4, 4))


def test_visited_tiles_per_query_tile_do_not_grow_with_the_image():
    # r = 5, 4×4 tiles: 3 row tiles of reach 4 → 3 column tiles each → 9 key tiles per interior query tile.
    assert reach_table(4, 4, 5) == [4, 4, 4]
    assert max(visited_key_tiles((9, 9), 5, (4, 4), (4, 4))) == 9
    assert max(visited_key_tiles((17, 21), 5, (4, 4), (4, 4))) == 9
    assert max(visited_key_tiles((400, 300), 5, (4, 4), (4, 4))) == 9
    for r in (8, 16, 32):  # the GPU tiles
        small, large = key_tiles_per_query_tile((96, 96), r), key_tiles_per_query_tile((512, 384), r)
        assert small.max() == large.max()
        assert 0 < large.float().mean() <= large.max()
        # about the area of the query tile dilated by the disc, over the key-tile area; far below all tiles
        keys = large.max().item() * 64
        assert math.pi * r * r < keys < 3 * (8 + 2 * r) * (16 + 2 * r)


# ---------------------------------------------------------------------------------------------------------
# Pooling and errors
# ---------------------------------------------------------------------------------------------------------


def test_pool_tokens_is_weighted_block_pooling():
    B, hw, H, D, T, f = 2, (4, 6), 3, 5, 2, 2
    x = torch.randn(B, T + 24, H, D)
    img = x[:, T:].reshape(B, 4, 6, H * D).permute(0, 3, 1, 2)
    avg = F.avg_pool2d(img, f).permute(0, 2, 3, 1).reshape(B, 6, H, D)
    assert rel_err(pool_tokens(x, hw, f, num_prefix_tokens=T), avg) < 1e-6
    w = torch.randn(1, 1, 1, f, 1, f, 1)  # the official spatial_weight layout
    want = torch.zeros(B, 2, 3, H, D)
    for i in range(2):
        for j in range(3):
            for a in range(f):
                for c in range(f):
                    want[:, i, j] += w[0, 0, 0, a, 0, c, 0] * x[:, T + (i * f + a) * 6 + (j * f + c)]
    assert rel_err(pool_tokens(x, hw, f, w, T), want.reshape(B, 6, H, D)) < 1e-6


def test_bad_input_raises_value_error():
    q, k, v = make(1, (3, 4), 2, 8, grad=False)
    pk = torch.randn(1, 2, 2, 8)
    bad = [
        dict(hw=(4, 4)),  # token count
        dict(hw=(3, 4), radius=0),
        dict(hw=(3, 4), radius=2.5),
        dict(hw=(3, 4), num_prefix_tokens=-1),
        dict(hw=(3, 4), num_prefix_tokens=1),  # N != T + h*w
        dict(hw=(3, 4), pooled_k=pk),  # pooled_v missing
        dict(hw=(3, 4), pooled_k=pk, pooled_v=torch.randn(1, 3, 2, 8)),
        dict(hw=(3, 4), backend="cuda"),
        dict(hw=12),
    ]
    for kw in bad:
        kw.setdefault("radius", 2)
        with pytest.raises(ValueError):
            window_attention(q, k, v, **kw)
    with pytest.raises(ValueError, match="shape"):
        window_attention(q[0], k, v, (3, 4), radius=2)
    with pytest.raises(ValueError, match="dtype"):
        window_attention(q, k.double(), v, (3, 4), radius=2)
    with pytest.raises(ValueError, match="fp64"):
        window_attention(q.double(), k.double(), v.double(), (3, 4), radius=2, backend="triton")
    with pytest.raises(ValueError, match="divide"):
        pool_tokens(k, (3, 4), 2)
    with pytest.raises(ValueError, match="factor"):
        pool_tokens(k, (3, 4), 0)
    with pytest.raises(ValueError, match="elements"):
        pool_tokens(torch.randn(1, 16, 2, 8), (4, 4), 2, torch.ones(3))
    with pytest.raises(ValueError, match="head dims"):
        big = torch.randn(1, 4, 1, 264)
        window_attention(big, big, big, (2, 2), radius=1, backend="triton")

"""pLSTM kernels: naive recurrence == log-doubling full G == chunked (PyTorch, Triton), official goldens,
1-D and DAG forms, gradients, input validation."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linvision.kernels.plstm import (
    ORIENTATION_FLIPS,
    gating_matrix_2d,
    grid_dag,
    grid_gates_to_dag,
    line_graph_pairs,
    plstm1d,
    plstm2d,
    plstm_dag,
)
from tests.helpers import rel_err

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "plstm"
GATES = ("s_r", "s_d", "t_rl", "t_du", "t_dl", "t_ru", "m_l", "m_u")


def problem(hw, O=4, B=2, H=2, Dk=3, Dv=4, dtype=torch.float64, mode="P", with_d=True):
    """Random q, k, v and gates in (0, 1). mode 'D' drops t_dl (chirality L); 'P' ties them like P-mode."""
    N = hw[0] * hw[1]
    q, k = torch.randn(B, N, H, Dk, dtype=dtype), torch.randn(B, N, H, Dk, dtype=dtype)
    v = torch.randn(B, N, H, Dv, dtype=dtype)
    gdt = torch.float64 if dtype == torch.float64 else torch.float32

    def g():
        return torch.rand(B, N, H, O, dtype=gdt)

    if mode == "P":
        alpha, s, t, m = g(), g(), g(), g()
        s_r, t_rl = alpha * s, alpha * t
        gates = dict(s_r=s_r, s_d=1 - s_r, t_rl=t_rl, t_du=1 - t_rl, t_dl=1 - t_rl, t_ru=t_rl, m_l=m, m_u=m)
    else:
        gates = {n: (None if n == "t_dl" else 2 * g() - 1 if n.startswith("t") else g()) for n in GATES}
    d = torch.rand(B, N, H, dtype=gdt) if with_d else None
    return q, k, v, [gates[n] for n in GATES], d


def run(method, q, k, v, gates, d, hw, **kw):
    return plstm2d(q, k, v, *gates, d, hw=hw, method=method, **kw)


# ----------------------------------------------------------------------------------------------------------
# the three PyTorch forms agree (fp64)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize(
    "hw,chunk,O",
    [((16, 16), 8, 4), ((16, 16), 4, 1), ((7, 9), 4, 4), ((13, 5), 2, 4), ((1, 1), 1, 4), ((1, 6), 2, 4), ((6, 1), 8, 1), ((3, 3), 1, 4)],
)
def test_chunked_full_naive_agree(mode, hw, chunk, O):
    q, k, v, gates, d = problem(hw, O=O, mode=mode)
    ref = run("naive", q, k, v, gates, d, hw)
    assert ref.dtype == torch.float64 and ref.shape == v.shape
    assert rel_err(run("chunked", q, k, v, gates, d, hw, chunk_size=chunk), ref) < 1e-6
    if hw[0] * hw[1] <= 81 or O == 1:
        assert rel_err(run("full", q, k, v, gates, d, hw), ref) < 1e-6


@pytest.mark.parametrize("piece_bytes", [1, 3 * 4 * 3 * 4 * 8, None])
@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("group_entries", [1, 3, None])
def test_inference_wavefront_equals_autograd_wavefront(monkeypatch, piece_bytes, mode, group_entries):
    """Without autograd the border states go through one in-place buffer, in groups of leading entries and
    strips of chunk rows (:mod:`linvision.kernels.plstm.wavefront`); strips of one chunk row, of three (the
    last one partial: 7 chunk rows) and the default single strip must give the autograd form's numbers (and
    the oracle's). The (head, orientation) entries are scanned one at a time, three at a time (orientation
    groups split across heads, a partial last one) or all together (the default on this small grid)."""
    from linvision.kernels.plstm import by_strip, wavefront

    if piece_bytes is not None:
        monkeypatch.setattr(wavefront, "PIECE_BYTES", piece_bytes)
    hw = (13, 11)
    q, k, v, gates, d = problem(hw, O=4, mode=mode)
    if group_entries is not None:  # frames padded to whole 2-token chunks: 14 × 12 nodes
        monkeypatch.setattr(by_strip, "GROUP_FRAME_BYTES", group_entries * 14 * 12 * max(q.shape[-1], v.shape[-1]) * 8)
        monkeypatch.setattr(by_strip, "MIN_GROUP_ENTRIES", 1)
    with torch.no_grad():
        fast = run("chunked", q, k, v, gates, d, hw, chunk_size=2)
    q.requires_grad_(True)
    slow = run("chunked", q, k, v, gates, d, hw, chunk_size=2)
    assert slow.requires_grad and not fast.requires_grad
    assert rel_err(fast, slow.detach()) < 1e-12
    assert rel_err(fast, run("naive", q.detach(), k, v, gates, d, hw)) < 1e-10


@pytest.mark.parametrize("strip_rows", [1, 3])
@pytest.mark.parametrize("group_entries", [1, 3, None])
def test_inference_strips_equal_the_autograd_form(monkeypatch, strip_rows, group_entries):
    """Without autograd a group's frames are built and scanned strip by strip of chunk rows
    (:mod:`linvision.kernels.plstm.by_strip`): strips of one chunk row and of three (7 chunk rows: the last strip
    partial, and strips taller than the wavefront's pieces), with one, three or all (head, orientation) entries per
    group, must give the autograd form's numbers. Odd grid, prefix-free, frames padded at both ends."""
    from linvision.kernels.plstm import by_strip, wavefront

    hw = (13, 11)
    q, k, v, gates, d = problem(hw, O=4, mode="P")
    frame_row = 2 * 12 * max(q.shape[-1], v.shape[-1]) * 8  # one chunk row (2 grid rows) of one entry's frame
    entries = 2 * 4 if group_entries is None else group_entries
    if group_entries is not None:
        monkeypatch.setattr(by_strip, "GROUP_FRAME_BYTES", group_entries * 14 * 12 * max(q.shape[-1], v.shape[-1]) * 8)
        monkeypatch.setattr(by_strip, "MIN_GROUP_ENTRIES", 1)
    monkeypatch.setattr(by_strip, "STRIP_FRAME_BYTES", strip_rows * entries * frame_row)
    monkeypatch.setattr(wavefront, "PIECE_BYTES", 2 * 2 * 3 * 4 * 8 * entries)  # pieces of one chunk row
    with torch.no_grad():
        fast = run("chunked", q, k, v, gates, d, hw, chunk_size=2)
    q.requires_grad_(True)
    slow = run("chunked", q, k, v, gates, d, hw, chunk_size=2)
    assert rel_err(fast, slow.detach()) < 1e-12


def test_full_g_form_at_16x16_four_orientations():
    hw = (16, 16)
    q, k, v, gates, d = problem(hw, O=4, B=1, H=1, mode="P")
    ref = run("naive", q, k, v, gates, d, hw)
    assert rel_err(run("full", q, k, v, gates, d, hw), ref) < 1e-6


def test_gating_matrix_is_the_linear_map():
    """out = s·Σ G (q·k′) v′: G's columns are the responses to single sources; G is lower-triangular-free
    only through the orientations, and d sits on its diagonal."""
    hw = (3, 4)
    q, k, v, gates, d = problem(hw, O=4, B=1, H=1, Dk=1, Dv=1, mode="D")
    G = gating_matrix_2d(*gates, d, hw=hw)
    N = 12
    assert G.shape == (1, 1, N, N)
    ones = torch.ones(1, N, 1, 1, dtype=torch.float64)
    for j in (0, 5, 11):
        vj = torch.zeros(1, N, 1, 1, dtype=torch.float64)
        vj[0, j] = 1.0
        col = run("naive", ones, ones, vj, gates, d, hw, scale=1.0)[0, :, 0, 0]
        torch.testing.assert_close(col, G[0, 0, :, j])
    torch.testing.assert_close(G[0, 0].diagonal(), d[0, :, 0])


def test_one_row_grid_is_the_1d_recurrence():
    """On an X×1 grid only x-edges exist: orientation 0 is the causal 1-D pLSTM with (S^r, T^rl, M^l)."""
    hw = (9, 1)
    q, k, v, gates, d = problem(hw, O=1, mode="D")
    g = dict(zip(GATES, gates))
    out2d = run("naive", q, k, v, gates, d, hw)
    out1d = plstm1d(q, k, v, g["s_r"][..., 0], g["t_rl"][..., 0], g["m_l"][..., 0], d)
    torch.testing.assert_close(out2d, out1d)


def test_hand_computed_2x1():
    """Two nodes along x, orientation 0: h_1 = s q_1·(M^l_1 S^r_0 k_0) v_0 + d_1 s (q_1·k_1) v_1."""
    q = torch.tensor([[[[1.0, 2.0]]], [[[0.5, -1.0]]]], dtype=torch.float64).transpose(0, 1)  # [1, 2, 1, 2]
    k = torch.tensor([[[[3.0, 1.0]]], [[[2.0, 2.0]]]], dtype=torch.float64).transpose(0, 1)
    v = torch.tensor([[[[1.0]]], [[[10.0]]]], dtype=torch.float64).transpose(0, 1)
    gates = [torch.full((1, 2, 1, 1), val, dtype=torch.float64) for val in (0.5, 0.3, 0.9, 0.8, 0.1, 0.2, 0.7, 0.6)]
    d = torch.full((1, 2, 1), 0.25, dtype=torch.float64)
    out = run("naive", q, k, v, gates, d, (2, 1), scale=1.0)
    h0 = 0.25 * (1 * 3 + 2 * 1) * 1.0
    h1 = 0.7 * 0.5 * (0.5 * 3 - 1 * 1) * 1.0 + 0.25 * (0.5 * 2 - 1 * 2) * 10.0
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([h0, h1], dtype=torch.float64))
    for method in ("full", "chunked"):
        torch.testing.assert_close(run(method, q, k, v, gates, d, (2, 1), scale=1.0), out)


def test_flips_are_the_four_corners():
    """Orientation o of a grid equals orientation 0 of the grid flipped by ORIENTATION_FLIPS[o]."""
    hw = (4, 5)
    q, k, v, gates, d = problem(hw, O=4, mode="P", with_d=False)
    full = run("naive", q, k, v, gates, None, hw)
    parts = []
    for o, (fx, fy) in enumerate(ORIENTATION_FLIPS):
        def flip(t):
            if t is None:
                return None
            g = t.unflatten(1, hw)
            dims = [dd for dd, f in ((1, fx), (2, fy)) if f]
            return (g.flip(dims) if dims else g).flatten(1, 2)

        one = [None if g is None else flip(g[..., o : o + 1]) for g in gates]
        parts.append(flip(run("naive", flip(q), flip(k), flip(v), one, None, hw)))
    torch.testing.assert_close(sum(parts), full)


# ----------------------------------------------------------------------------------------------------------
# official goldens (ml-jku/plstm a404ff3; see tests/fixtures/plstm/README.md)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.golden
@pytest.mark.parametrize("method", ["naive", "full", "chunked"])
def test_official_kernel_goldens(method):
    t = load_file(FIXTURES / "kernel_8x8_fp64.safetensors")
    gates = [t[n] for n in GATES]
    no_dl = [None if n == "t_dl" else g for n, g in zip(GATES, gates)]
    hw = (8, 8)
    assert rel_err(run(method, t["q"], t["k"], t["v"], gates, t["d"], hw), t["fused_out"]) < 1e-12
    assert rel_err(run(method, t["q"], t["k"], t["v"], no_dl, t["d"], hw), t["fused_out_no_tdl"]) < 1e-12
    o0 = [None if g is None else g[..., :1] for g in gates]
    o0_no_dl = [None if g is None else g[..., :1] for g in no_dl]
    assert rel_err(run(method, t["q"], t["k"], t["v"], o0, t["d"], hw), t["chunked_o0_out"]) < 1e-12
    assert rel_err(run(method, t["q"], t["k"], t["v"], o0_no_dl, t["d"], hw), t["chunked_o0_out_no_tdl"]) < 1e-12


@pytest.mark.golden
def test_official_1d_golden():
    t = load_file(FIXTURES / "kernel_8x8_fp64.safetensors")
    out = plstm1d(t["q1d"], t["k1d"], t["v1d"], t["s1d"], t["t1d"], t["m1d"], t["d1d"])
    assert rel_err(out, t["out1d"]) < 1e-12


# ----------------------------------------------------------------------------------------------------------
# gradients of the PyTorch reference (float64 gradcheck)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,hw,O,chunk", [("chunked", (3, 3), 1, 2), ("chunked", (2, 3), 4, 1), ("full", (2, 3), 4, 8)])
def test_gradcheck_reference(method, hw, O, chunk):
    q, k, v, gates, d = problem(hw, O=O, B=1, H=1, Dk=2, Dv=2, mode="D")
    gates = [None if g is None else g.requires_grad_(True) for g in gates]
    inputs = [q, k, v, d] + [g for g in gates if g is not None]
    for t in inputs:
        t.requires_grad_(True)

    def fn(q, k, v, d, *gs):
        it = iter(gs)
        full = [None if g is None else next(it) for g in gates]
        return plstm2d(q, k, v, *full, d, hw=hw, method=method, chunk_size=chunk)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------
# 1-D and DAG forms
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("hw", [(4, 5), (1, 4), (3, 1)])
def test_dag_on_grid_equals_2d(mode, hw):
    q, k, v, gates, d = problem(hw, O=1, mode=mode)
    edges = grid_dag(hw)
    pairs = line_graph_pairs(edges)
    s, t, m = grid_gates_to_dag(edges, pairs, hw, *[None if g is None else g[..., 0] for g in gates])
    out_dag = plstm_dag(q, k, v, edges, s, t, m, d)
    torch.testing.assert_close(out_dag, run("naive", q, k, v, gates, d, hw))
    torch.testing.assert_close(out_dag, run("chunked", q, k, v, gates, d, hw, chunk_size=2))


def test_dag_chain_equals_1d():
    N = 7
    q, k, v, gates, d = problem((N, 1), O=1, mode="D")
    s, t, m = (g[..., 0] for g in (gates[0], gates[2], gates[6]))
    edges = torch.tensor([[i, i + 1] for i in range(N - 1)])
    pairs = line_graph_pairs(edges)
    assert pairs.tolist() == [[i, i + 1] for i in range(N - 2)]
    out = plstm_dag(q, k, v, edges, s[:, :-1], t[:, 1:-1], m[:, 1:], d)
    torch.testing.assert_close(out, plstm1d(q, k, v, s, t, m, d))


def test_dag_general_graph_by_hand():
    """A diamond 0→1, 0→2, 1→3, 2→3: node 3 reads both paths; gradients flow (float64 gradcheck)."""
    edges = torch.tensor([[0, 1], [0, 2], [1, 3], [2, 3]])
    pairs = line_graph_pairs(edges)
    assert pairs.tolist() == [[0, 2], [1, 3]]
    B, N, H = 1, 4, 1
    q, k = torch.rand(B, N, H, 2, dtype=torch.float64), torch.rand(B, N, H, 2, dtype=torch.float64)
    v = torch.rand(B, N, H, 1, dtype=torch.float64)
    s, m = torch.rand(B, 4, H, dtype=torch.float64), torch.rand(B, 4, H, dtype=torch.float64)
    t = torch.rand(B, 2, H, dtype=torch.float64)
    out = plstm_dag(q, k, v, edges, s, t, m, scale=1.0)
    kv0 = k[0, 0, 0] * v[0, 0, 0]  # k_0 v_0ᵀ with Dv = 1
    c0, c1 = s[0, 0, 0] * kv0, s[0, 1, 0] * kv0
    c2 = t[0, 0, 0] * c0 + s[0, 2, 0] * k[0, 1, 0] * v[0, 1, 0]
    c3 = t[0, 1, 0] * c1 + s[0, 3, 0] * k[0, 2, 0] * v[0, 2, 0]
    h3 = m[0, 2, 0] * (q[0, 3, 0] @ c2) + m[0, 3, 0] * (q[0, 3, 0] @ c3)
    torch.testing.assert_close(out[0, 3, 0, 0], h3)
    assert out[0, 0].abs().max() == 0
    ins = [x.requires_grad_(True) for x in (q, k, v, s, t, m)]
    assert torch.autograd.gradcheck(lambda q, k, v, s, t, m: plstm_dag(q, k, v, edges, s, t, m), ins)


# ----------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_raises_value_error():
    hw = (3, 4)
    q, k, v, gates, d = problem(hw, O=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="hw"):
        run("chunked", q, k, v, gates, d, (3, 5))
    with pytest.raises(ValueError, match="hw"):
        run("chunked", q, k, v, gates, d, 12)
    with pytest.raises(ValueError, match="4-D"):
        run("chunked", q[0], k, v, gates, d, hw)
    with pytest.raises(ValueError, match="dtype"):
        run("chunked", q, k.double(), v, gates, d, hw)
    with pytest.raises(ValueError, match="gate s_r"):
        run("chunked", q, k, v, [gates[0][:, :5]] + gates[1:], d, hw)
    with pytest.raises(ValueError, match="one shape"):
        run("chunked", q, k, v, [gates[0][..., :1]] + gates[1:], d, hw)
    with pytest.raises(ValueError, match="1 or 4"):
        run("chunked", q, k, v, [g[..., :3] for g in gates], d, hw)
    with pytest.raises(ValueError, match="required"):
        run("chunked", q, k, v, [None] + gates[1:], d, hw)
    with pytest.raises(ValueError, match="gate d"):
        run("chunked", q, k, v, gates, d[..., None], hw)
    with pytest.raises(ValueError, match="chunk_size"):
        run("chunked", q, k, v, gates, d, hw, chunk_size=3)
    with pytest.raises(ValueError, match="method"):
        run("scan", q, k, v, gates, d, hw)
    with pytest.raises(ValueError, match="backend"):
        run("chunked", q, k, v, gates, d, hw, backend="cuda")
    with pytest.raises(ValueError, match="chunked"):
        run("full", q, k, v, gates, d, hw, backend="triton")
    with pytest.raises(ValueError, match="fp64"):
        run("chunked", q.double(), k.double(), v.double(), gates, d, hw, backend="triton")
    with pytest.raises(ValueError, match="scale"):
        run("chunked", q, k, v, gates, d, hw, scale=0.0)


def test_dag_bad_input_raises_value_error():
    q = torch.randn(1, 3, 1, 2)
    s = m = torch.rand(1, 2, 1)
    t = torch.rand(1, 1, 1)
    with pytest.raises(ValueError, match="topological"):
        plstm_dag(q, q, q, torch.tensor([[1, 2], [0, 1]]), s, t, m)
    with pytest.raises(ValueError, match="lie in"):
        plstm_dag(q, q, q, torch.tensor([[0, 1], [1, 3]]), s, t, m)
    with pytest.raises(ValueError, match="self-loop"):
        plstm_dag(q, q, q, torch.tensor([[0, 0], [0, 1]]), s, t, m)
    with pytest.raises(ValueError, match="gate t"):
        plstm_dag(q, q, q, torch.tensor([[0, 1], [1, 2]]), s, torch.rand(1, 2, 1), m)
    with pytest.raises(ValueError, match="Triton"):
        plstm1d(q, q, q, torch.rand(1, 3, 1), torch.rand(1, 3, 1), torch.rand(1, 3, 1), backend="triton")


# ----------------------------------------------------------------------------------------------------------
# Triton (CPU interpreter): forward kernels, gradients through the recomputing backward
# ----------------------------------------------------------------------------------------------------------

TRITON_TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def _triton_case(hw, dtype, mode, O=4, prefix=0, Dk=4, Dv=8):
    """A packed ``qkv`` with prefix tokens in front, and a view maker: q, k, v reach the kernel strided."""
    N = hw[0] * hw[1]
    B, H = 1, 1
    qkv = torch.randn(B, prefix + N, 3, H, max(Dk, Dv)).to(dtype)
    _, _, _, gates, d = problem(hw, O=O, B=B, H=H, Dk=Dk, Dv=Dv, dtype=torch.float32, mode=mode)

    def views(t):
        return t[:, prefix:, 0, :, :Dk], t[:, prefix:, 1, :, :Dk], t[:, prefix:, 2, :, :Dv]

    return qkv, views, gates, d


def _grads(method, backend, qkv, views, gates, d, hw, chunk, seed=0):
    leaf = qkv.detach().clone().requires_grad_(True)
    gl = [None if g is None else g.detach().clone().requires_grad_(True) for g in gates]
    dl = d.detach().clone().requires_grad_(True)
    q, k, v = views(leaf)
    if backend == "triton":
        assert not q.is_contiguous()
    out = plstm2d(q, k, v, *gl, dl, hw=hw, method=method, chunk_size=chunk, backend=backend)
    torch.manual_seed(seed)
    w = torch.randn(out.shape, dtype=torch.float32)
    (out.float() * w.to(out.device)).sum().backward()
    return out, [leaf.grad] + [g.grad for g in gl if g is not None] + [dl.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hw,mode,chunk,prefix", [((7, 9), "P", 8, 1), ((13, 5), "D", 4, 2)])
def test_triton_matches_reference_forward_and_grads(dtype, hw, mode, chunk, prefix):
    qkv, views, gates, d = _triton_case(hw, dtype, mode, prefix=prefix)
    out, grads = _grads("chunked", "triton", qkv, views, gates, d, hw, chunk)
    ref_gates = [None if g is None else g.double() for g in gates]
    ref, ref_grads = _grads("naive", "torch", qkv.double(), views, ref_gates, d.double(), hw, chunk)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TRITON_TOL[dtype]
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < TRITON_TOL[dtype]


def test_triton_tl_dot_path_single_orientation():
    """chunk 16 with Dv 16 takes the tl.dot path of both kernels (interpreted)."""
    hw = (13, 5)
    qkv, views, gates, d = _triton_case(hw, torch.float32, "P", O=1, Dk=16, Dv=16)
    q, k, v = views(qkv)
    out = plstm2d(q, k, v, *gates, d, hw=hw, chunk_size=16, backend="triton")
    ref = plstm2d(q.double(), k.double(), v.double(), *[g.double() for g in gates], d.double(), hw=hw, method="naive")
    assert rel_err(out, ref) < 1e-5


def test_triton_backward_matches_pytorch_chunked_backward():
    """Independent backward implementations (Triton kernels vs autograd through the PyTorch chunked form)."""
    hw = (5, 6)
    qkv, views, gates, d = _triton_case(hw, torch.float32, "D", O=4)
    _, g_tri = _grads("chunked", "triton", qkv, views, gates, d, hw, 4)
    _, g_ref = _grads("chunked", "torch", qkv, views, gates, d, hw, 4)
    for a, b in zip(g_tri, g_ref):
        assert rel_err(a, b) < 1e-5


def test_triton_recompute_backward_for_large_heads(monkeypatch):
    """Above MAX_BWD_DIM the backward re-runs the PyTorch chunked scan; same gradients."""
    import linvision.kernels.plstm.triton as tri

    monkeypatch.setattr(tri, "MAX_BWD_DIM", 0)
    hw = (3, 5)
    qkv, views, gates, d = _triton_case(hw, torch.float32, "P", O=4, prefix=1)
    _, g_tri = _grads("chunked", "triton", qkv, views, gates, d, hw, 2)
    _, g_ref = _grads("naive", "torch", qkv.double(), views, [g.double() for g in gates], d.double(), hw, 2)
    for a, b in zip(g_tri, g_ref):
        assert rel_err(a, b) < 1e-5

"""TransNormer's NormAttention (``transnormer``) and DiagAttention (``transnormer_diag``): parity with the
official fairseq-evo modules, the 2-D block layout against a dense-mask oracle, numerics and option errors."""
import pytest
import torch
import torch.nn.functional as F

from linvision import create_mixer
from linvision.mixers import grid_blocks, transnormer_diag
from linvision.mixers.grid_blocks import block_local, block_rectangles
from linvision.mixers.transnormer_norms import build_norm
from tests.helpers import rel_err
from tests.mixers.test_parity_official import TOL, load_case, load_exact

# OpenNLPLab/fairseq-evo @38fa81f, fairseq/modules/x_attention/norm_linear_attention.py::NormLinearAttention and
# norm_local_attention.py::NormLocalAttention.forward_chunk (non-causal); see tests/fixtures/transnormer/README.md.
NORM_CASES = {
    "norm_t2": dict(act_fun="1+elu", norm_type="simplermsnorm"),
    "norm_t1_gated": dict(act_fun="elu", norm_type="gatedrmsnorm"),
    "norm_relu_layernorm": dict(act_fun="relu", norm_type="layernorm"),
}
DIAG_CASES = {  # official 1-D chunks of r·w raster tokens = tiles of r whole rows
    "diag_t2_softmax_64": dict(block_size=(8, 8), use_softmax=True, norm_type="simplermsnorm"),
    "diag_t1_relu_32_gated": dict(block_size=(4, 8), use_softmax=False, norm_type="gatedrmsnorm"),
    "diag_relu_64_simple": dict(block_size=(4, 16), use_softmax=False, norm_type="simplermsnorm"),
}


@pytest.mark.parametrize("name,case,opts", [("transnormer", c, o) for c, o in NORM_CASES.items()]
                         + [("transnormer_diag", c, o) for c, o in DIAG_CASES.items()])
def test_matches_official(name, case, opts):
    params, x, ref, hw, prefix = load_case("transnormer", case)
    mixer = load_exact(create_mixer(name, dim=32, num_heads=2, **opts), params)
    with torch.no_grad():
        out = mixer(x, hw, prefix)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_official_fixtures_tell_the_options_apart():
    """A wrong feature map, norm or block shape misses the official output by far more than the tolerance."""
    params, x, ref, hw, prefix = load_case("transnormer", "norm_t2")
    wrong = load_exact(create_mixer("transnormer", dim=32, num_heads=2, act_fun="relu"), params)
    with torch.no_grad():
        assert rel_err(wrong(x, hw, prefix), ref) > 1e-2
    params, x, ref, hw, prefix = load_case("transnormer", "diag_t2_softmax_64")
    square = load_exact(create_mixer("transnormer_diag", dim=32, num_heads=2, block_size=4), params)
    with torch.no_grad():
        assert rel_err(square(x, hw, prefix), ref) > 1e-2


def _dense_block_oracle(q, k, v, hw, block, prefix, use_softmax):
    """Block-local attention through an explicit N×N mask: image tokens within their tile, prefix rows global."""
    (h, w), (bh, bw) = hw, block
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    tile = ((ys // bh) * (w + bw) + xs // bw).flatten() + 1  # distinct ids per tile
    ids = torch.cat([torch.zeros(prefix, dtype=torch.long), tile])
    allowed = ids[:, None] == ids[None, :]
    allowed[:prefix] = True
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if use_softmax:
        p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    else:
        p = F.relu(scores) * allowed
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("use_softmax", [True, False])
@pytest.mark.parametrize("hw,block,prefix", [((7, 9), (3, 4), 1), ((5, 5), (8, 8), 0), ((10, 3), (4, 2), 2)])
def test_tiles_match_a_dense_mask(hw, block, prefix, use_softmax):
    """Ragged edge tiles, blocks larger than the grid, prefix tokens: the same as a masked dense attention."""
    torch.manual_seed(0)
    m = create_mixer("transnormer_diag", dim=16, num_heads=2, block_size=block, use_softmax=use_softmax).double()
    x = torch.randn(2, prefix + hw[0] * hw[1], 16, dtype=torch.float64)
    q, k, v = (m.split_heads(p(x)) for p in (m.q_proj, m.k_proj, m.v_proj))
    o = _dense_block_oracle(q, k, v, hw, block, prefix, use_softmax).flatten(2)
    ref = m.out_proj(o if use_softmax else m.norm(o))
    assert rel_err(m(x, hw, prefix), ref) < 1e-12


@pytest.mark.parametrize("tokens", [1, 13, 30])
def test_tiles_match_a_dense_mask_in_rectangles_narrower_than_the_grid(monkeypatch, tokens):
    """Rectangles of a few blocks, cut inside a row of blocks (as on wide grids), with ragged edge tiles and a
    prefix: still the masked dense attention."""
    monkeypatch.setattr(transnormer_diag, "chunk_tokens", lambda batch, channels: tokens)
    monkeypatch.setattr(grid_blocks, "CHUNK_ELEMENTS", tokens * 2 * 8)  # rectangles inside block_local too
    hw, block, prefix = (7, 11), (3, 2), 1
    assert any(c1 - c0 < hw[1] for _, _, c0, c1 in block_rectangles(hw, block, tokens))
    test_tiles_match_a_dense_mask(hw, block, prefix, use_softmax=True)
    test_tiles_match_a_dense_mask(hw, block, prefix, use_softmax=False)


@pytest.mark.parametrize("hw,block,tokens", [((7, 11), (3, 2), 13), ((7, 11), (3, 2), 40), ((16, 16), (8, 8), 64),
                                             ((5, 5), (8, 8), 1)])
def test_block_rectangles_cover_the_grid_once_in_whole_blocks(hw, block, tokens):
    (h, w), (bh, bw) = hw, block
    seen = torch.zeros(h, w, dtype=torch.long)
    for r0, r1, c0, c1 in block_rectangles(hw, block, tokens):
        assert r0 % bh == 0 and c0 % bw == 0 and (r1 % bh == 0 or r1 == h) and (c1 % bw == 0 or c1 == w)
        assert (r1 - r0) * (c1 - c0) <= max(tokens, bh * bw)  # no larger than asked, unless one block is
        seen[r0:r1, c0:c1] += 1
    assert (seen == 1).all()


def test_block_local_gradcheck():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3 * 3, 1, 2, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fn = lambda a, b, c: F.scaled_dot_product_attention(a, b, c)  # noqa: E731
    assert torch.autograd.gradcheck(lambda a, b, c: block_local(a, b, c, (3, 3), (2, 2), fn), (q, k, v),
                                    fast_mode=True)


def test_norm_attention_gradcheck_and_quadratic_oracle():
    """fp64 gradients of the whole mixer, and ``Norm(φQ(φKᵀV))`` written out with the N×N scores."""
    torch.manual_seed(0)
    m = create_mixer("transnormer", dim=4, num_heads=2, norm_type="gatedrmsnorm").double()
    x = torch.randn(1, 1 + 2 * 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t, (2, 3), 1), (x,), fast_mode=True)
    q, k, v = (m.split_heads(p(x)).transpose(1, 2) for p in (m.q_proj, m.k_proj, m.v_proj))
    q, k = F.elu(q) + 1, F.elu(k) + 1
    o = ((q @ k.transpose(-1, -2)) @ v).transpose(1, 2).flatten(2)
    assert rel_err(m(x, (2, 3), 1), m.out_proj(m.layer_norm(o))) < 1e-12


@pytest.mark.parametrize("norm_type", ["simplermsnorm", "layernorm"])
def test_norm_attention_half_precision_large_sums(norm_type):
    """Sums far beyond the fp16 range (large inputs, 64K tokens would be worse): finite, close to fp32."""
    torch.manual_seed(0)
    m = create_mixer("transnormer", dim=16, num_heads=2, norm_type=norm_type)
    x = 30 * torch.randn(1, 4096, 16)
    ref = m(x, (64, 64))
    with torch.no_grad():
        assert m.q_proj(x).max() > 50  # φ(q)·φ(k)·v summed over 4096 tokens: ≫ 65504
        out = m.half()(x.half(), (64, 64))
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2


def test_diag_relu_branch_half_precision_large_sums():
    """ReLU(q·kᵀ/√D)·v summed over a 64-token tile overflows fp16 at inputs of scale 100 (the fp16 result
    was all NaN): it stays fp32 up to and through the norm."""
    torch.manual_seed(0)
    m = create_mixer("transnormer_diag", dim=32, num_heads=2, use_softmax=False)
    x = 100 * torch.randn(1, 1 + 16 * 16, 32)
    ref = m(x, (16, 16), 1)
    xh = x.half().requires_grad_()
    out = m.half()(xh, (16, 16), 1)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 1e-2
    out.float().square().mean().backward()
    assert torch.isfinite(xh.grad).all()


def test_norms_are_fp32_and_official_formulas():
    x = torch.randn(3, 8, dtype=torch.float16) * 1000
    rms = x.float().norm(dim=-1, keepdim=True) * 8 ** -0.5
    n = build_norm("gatedrmsnorm", 8)
    with torch.no_grad():
        n.gate.fill_(0.01)
        n.scale.fill_(2.0)
    expected = 2.0 * x.float() / (rms + 1e-8) * torch.sigmoid(0.01 * x.float())
    assert n(x).dtype == torch.float32 and rel_err(n(x), expected) < 1e-6
    assert rel_err(build_norm("simplermsnorm", 8)(x), x.float() / (rms + 1e-8)) < 1e-6


@pytest.mark.parametrize("name,opts,match", [
    ("transnormer", dict(act_fun="gelu"), "act_fun"),
    ("transnormer", dict(norm_type="batchnorm"), "norm_type"),
    ("transnormer", dict(bias=1), "bias"),
    ("transnormer", dict(backend="cuda"), "backend"),
    ("transnormer_diag", dict(block_size=0), "block_size"),
    ("transnormer_diag", dict(block_size=(8, 8, 8)), "block_size"),
    ("transnormer_diag", dict(block_size=4.0), "block_size"),
    ("transnormer_diag", dict(use_softmax="yes"), "use_softmax"),
    ("transnormer_diag", dict(norm_type="gatedrmsnorm"), "not applied"),
    ("transnormer_diag", dict(act_fun="elu"), "act_fun"),
])
def test_bad_options(name, opts, match):
    with pytest.raises(ValueError, match=match):
        create_mixer(name, dim=16, num_heads=2, **opts)


@pytest.mark.parametrize("act_fun", ["1+elu", "elu", "relu"])
def test_triton_backend_matches_torch(act_fun):
    """The kernel's Triton path (interpreted on CPU) under ``normalize="none"``, ``mean=True``: forward and dx."""
    torch.manual_seed(0)
    x = torch.randn(1, 1 + 5 * 7, 16, requires_grad=True)
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(1)
        m = create_mixer("transnormer", dim=16, num_heads=2, act_fun=act_fun, backend=backend)
        out = m(x, (5, 7), 1)
        (dx,) = torch.autograd.grad(out.square().sum(), x)
        results.append((out, dx))
    (ref, dref), (out, dx) = results
    assert rel_err(out, ref) < 1e-5 and rel_err(dx, dref) < 1e-5

"""The pLSTM mixer: parity with the official fused layer, P/D gates and initialisation, prefix tokens, methods."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import linvision
from linvision.mixers.plstm import PLSTMMixer, convert_official_state_dict
from tests.helpers import rel_err

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "plstm"
DIM, HEADS = 32, 2


def make(**options):
    torch.manual_seed(0)
    return linvision.create_mixer("plstm", dim=DIM, num_heads=HEADS, **options)


def randomise(m, seed=0):
    """Non-trivial gates: the official init has zero gate weights (input-independent gates)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("_weight") and name != "norm_weight":
                p.copy_(torch.randn(p.shape, generator=g) * (8.0 if name == "orientation_weight" else 0.5))
            elif name.endswith("_bias"):
                p.copy_(torch.randn(p.shape, generator=g) - 1.0)
    return m


@pytest.mark.golden
@pytest.mark.parametrize("mode", ["P", "D"])
@pytest.mark.parametrize("method", ["chunked", "full", "naive"])
def test_official_layer_goldens(mode, method):
    """``pLSTM2DLayerFused`` (vision config, random parameters) → convert → same outputs (fp32)."""
    t = load_file(FIXTURES / f"layer_{mode}_fp32.safetensors")
    sd = {k[len("param."):]: v for k, v in t.items() if k.startswith("param.")}
    m = linvision.create_mixer("plstm", dim=16, num_heads=2, mode=mode, method=method)
    result = m.load_state_dict(convert_official_state_dict(sd, mode), strict=False)
    assert result.missing_keys == ["prefix_bias"] and not result.unexpected_keys
    for h, w in ((8, 8), (6, 6)):
        x, y = t[f"x_{h}x{w}"], t[f"y_{h}x{w}"]
        out = m(x.reshape(1, h * w, 16), hw=(h, w)).reshape(y.shape)
        assert rel_err(out, y) < 1e-5


@pytest.mark.parametrize("mode", ["P", "D"])
def test_methods_agree_on_odd_grids_with_prefix(mode):
    m = randomise(make(mode=mode)).double()
    x = torch.randn(2, 2 + 7 * 9, DIM, dtype=torch.float64)
    outs = []
    for method, chunk in (("naive", 8), ("full", 8), ("chunked", 2), ("chunked", 8)):
        m.method, m.chunk_size = method, chunk
        outs.append(m(x, hw=(7, 9), num_prefix_tokens=2))
    for o in outs[1:]:
        assert rel_err(o, outs[0]) < 1e-6


def test_official_initialisation():
    m = make(mode="P")
    sig = torch.sigmoid
    torch.testing.assert_close(m.source_bias, torch.full((4 * HEADS,), -4.0))
    torch.testing.assert_close(m.transition_bias, torch.full((4 * HEADS,), 1.0))
    torch.testing.assert_close(m.orientation_bias, torch.linspace(-2, 2, HEADS).expand(4, HEADS))
    assert m.proj.bias is None and m.qkv.bias is not None and m.qkv.bias.abs().max() == 0
    std = m.qkv.weight.std().item()
    assert abs(std - (2.5 * DIM) ** -0.5) < 0.03
    g = m.gates(torch.randn(1, 6, DIM))
    # gate weights start at zero: gates are input-independent
    torch.testing.assert_close(g["m_l"], torch.full_like(g["m_l"], sig(torch.tensor(-4.0)).item()))
    torch.testing.assert_close(g["d"], torch.full_like(g["d"], sig(torch.tensor(-6.0)).item()))
    # P-mode: channel c = 4h + o takes the flattened [4, H] orientation bias at c = i·H + j
    alpha = sig(m.orientation_bias.reshape(-1)).reshape(HEADS, 4)
    torch.testing.assert_close(g["t_rl"][0, 0], alpha * torch.tanh(torch.tensor(5.0)))
    torch.testing.assert_close(g["s_r"][0, 0], alpha * sig(torch.tensor(-4.0)))


def test_pmode_gates_sum_to_one():
    m = randomise(make(mode="P"))
    g = m.gates(torch.randn(2, 10, DIM))
    torch.testing.assert_close(g["t_rl"] + g["t_dl"], torch.ones_like(g["t_rl"]))
    torch.testing.assert_close(g["s_r"] + g["s_d"], torch.ones_like(g["s_r"]))  # S^d = 1 − S^r, as coded
    assert g["t_ru"] is not None and torch.equal(g["t_ru"], g["t_rl"]) and torch.equal(g["m_l"], g["m_u"])


@pytest.mark.parametrize("chirality,missing", [("L", "t_dl"), ("R", "t_ru")])
def test_dmode_chirality(chirality, missing):
    m = randomise(make(mode="D", dmode_chirality=chirality))
    g = m.gates(torch.randn(1, 4, DIM))
    assert g[missing] is None
    other = "t_ru" if missing == "t_dl" else "t_dl"
    assert g[other] is not None and g[other].abs().max() <= 1


def test_gate_slices_are_per_channel():
    """Gate channel c = 4h + o reads only x[c·w:(c+1)·w] (official sub_heads = 4·H)."""
    m = randomise(make(mode="D"))
    x = torch.randn(1, 3, DIM)
    x2 = x.clone()
    x2[..., :4] += 1.0  # slice of channel 0 = head 0, orientation 0
    a, b = m.gates(x)["s_r"], m.gates(x2)["s_r"]
    changed = (a - b).abs().amax(dim=(0, 1)) > 0
    assert changed[0, 0] and changed.sum() == 1


def test_prefix_bypass_leaves_image_tokens_alone():
    m = randomise(make(prefix_mode="bypass"))
    x = torch.randn(2, 3 + 5 * 4, DIM)
    with_prefix = m(x, hw=(5, 4), num_prefix_tokens=3)
    without = m(x[:, 3:], hw=(5, 4))
    torch.testing.assert_close(with_prefix[:, 3:], without)
    # a prefix token only sees itself
    x2 = x.clone()
    x2[:, 0] += 1.0
    torch.testing.assert_close(m(x2, hw=(5, 4), num_prefix_tokens=3)[:, 1:], with_prefix[:, 1:])


def test_prefix_global_both_directions():
    m = randomise(make())
    x = torch.randn(1, 2 + 4 * 4, DIM, requires_grad=True)
    y = m(x, hw=(4, 4), num_prefix_tokens=2)
    (gp,) = torch.autograd.grad(y[:, 0].sum(), x, retain_graph=True)  # prefix output reads every token
    assert (gp[0].abs().sum(-1) > 0).all()
    (gi,) = torch.autograd.grad(y[:, 2].sum(), x)  # image token (0, 0) reads the prefix tokens
    assert (gi[0, :2].abs().sum(-1) > 0).all()


def test_prefix_global_without_prefix_equals_bypass():
    m = randomise(make())
    b = make(prefix_mode="bypass")
    b.load_state_dict({k: v for k, v in m.state_dict().items() if k != "prefix_bias"})
    x = torch.randn(2, 6 * 3, DIM)
    torch.testing.assert_close(m(x, hw=(6, 3)), b(x, hw=(6, 3)))


def test_triton_backend_matches_torch_with_prefix():
    """The mixer on the Triton path (interpreted) at an odd grid with a class token: outputs and grads."""
    m = randomise(make(mode="D", backend="triton"))
    ref = randomise(make(mode="D", backend="torch"))
    x = torch.randn(1, 1 + 7 * 9, DIM)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = m(xa, hw=(7, 9), num_prefix_tokens=1), ref(xb, hw=(7, 9), num_prefix_tokens=1)
    assert rel_err(ya, yb) < 1e-5
    w = torch.randn_like(ya)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert rel_err(xa.grad, xb.grad) < 1e-5
    for (n, pa), (_, pb) in zip(m.named_parameters(), ref.named_parameters()):
        assert rel_err(pa.grad, pb.grad) < 1e-5, n


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="4\\*num_heads"):
        linvision.create_mixer("plstm", dim=24, num_heads=4)
    with pytest.raises(ValueError, match="mode"):
        make(mode="Q")
    with pytest.raises(ValueError, match="prefix_mode"):
        make(prefix_mode="cls")
    with pytest.raises(ValueError, match="chirality"):
        make(dmode_chirality="X")
    with pytest.raises(ValueError, match="method"):
        make(method="scan")
    with pytest.raises(ValueError, match="chunk_size"):
        make(chunk_size=6)
    with pytest.raises(ValueError, match="mode"):
        convert_official_state_dict({}, mode="X")
    assert isinstance(make(), PLSTMMixer)


def test_scan_is_a_compile_boundary():
    """Under ``torch.compile`` the 2-D scan runs eagerly (a graph break): traced, its per-anti-diagonal loops
    and the log doubling unroll into the graph (450 ops for one layer on 8×8, minutes of compile time for
    pLSTM-Vis); compiled outputs are the eager ones, with and without autograd."""
    m = randomise(make())
    x = torch.randn(1, 64, DIM)
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(x, (8, 8))
    assert explained.op_count < 100
    compiled = torch.compile(m, backend="eager")
    with torch.no_grad():
        assert rel_err(compiled(x, (8, 8)), m(x, (8, 8))) < 1e-6
    xg = x.clone().requires_grad_(True)
    compiled(xg, (8, 8)).square().sum().backward()
    xe = x.clone().requires_grad_(True)
    m(xe, (8, 8)).square().sum().backward()
    assert rel_err(xg.grad, xe.grad) < 1e-6
    torch._dynamo.reset()

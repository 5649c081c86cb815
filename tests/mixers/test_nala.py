"""NaLaFormer: NaLa against a literal restatement of the official forward, and RoPE's properties."""
import math

import pytest
import torch
import torch.nn.functional as F

import linvision
from linvision.mixers.nala import NormAwareLinearAttn, VanillaSelfAttention, apply_rope, rope_2d
from tests.helpers import rel_err

DIM, HEADS = 32, 2  # head_dim 16


# --- an independent restatement of NALA.py, in its [B, heads, N, d] layout ------------------------
def official_sin_cos(head_dim, hw, prefix):
    """RoPE tables as NALA.py::RoPE builds them (angle repeated in pairs, rows then columns), prefix at 0."""
    h, w = hw
    angle = 1.0 / (10000 ** torch.linspace(0, 1, head_dim // 4))
    angle = angle.unsqueeze(-1).repeat(1, 2).flatten()
    ih, iw = torch.arange(h).float(), torch.arange(w).float()
    sin = torch.cat([torch.sin(ih[:, None] * angle).unsqueeze(1).repeat(1, w, 1),
                     torch.sin(iw[:, None] * angle).unsqueeze(0).repeat(h, 1, 1)], -1).flatten(0, 1)
    cos = torch.cat([torch.cos(ih[:, None] * angle).unsqueeze(1).repeat(1, w, 1),
                     torch.cos(iw[:, None] * angle).unsqueeze(0).repeat(h, 1, 1)], -1).flatten(0, 1)
    sin = torch.cat([torch.zeros(prefix, head_dim), sin])
    cos = torch.cat([torch.ones(prefix, head_dim), cos])
    return sin, cos


def every_two(x):
    a, b = x[..., ::2], x[..., 1::2]
    return torch.stack([-b, a], dim=-1).flatten(-2)


def shift(x, sin, cos):
    return x * cos + every_two(x) * sin


def reference(m, x, hw, prefix=0, softmax=False):
    B, N, C = x.shape
    H, d = m.num_heads, C // m.num_heads
    h, w = hw
    qkvg = F.linear(x, m.qkvg.weight, m.qkvg.bias).reshape(B, N, 4, C).permute(2, 0, 1, 3).float()
    q, k, v, g = qkvg[0], qkvg[1], qkvg[2], qkvg[3]
    lepe = m.lepe(v[:, prefix:].reshape(B, h, w, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(B, h * w, C)
    lepe = torch.cat([torch.zeros(B, prefix, C), lepe], 1)
    q, k, v = (t.reshape(B, N, H, d).permute(0, 2, 1, 3) for t in (q, k, v))
    sin, cos = official_sin_cos(d, hw, prefix)
    if softmax:
        q, k = shift(q, sin, cos), shift(k, sin, cos)
        o = torch.softmax(d**-0.5 * q @ k.transpose(-1, -2), dim=-1) @ v
    else:
        k = k**3
        n = q.norm(dim=-1, p=2, keepdim=True)
        power = 3 * (0.5 + torch.tanh(n))
        q1, q2 = (torch.relu(q) / n) ** power, (torch.relu(-q) / n) ** power
        k1, k2 = torch.relu(k), torch.relu(-k)
        q_rot = torch.cat([shift(q1, sin, cos), shift(q2, sin, cos)], -1)
        k_rot = torch.cat([shift(k1, sin, cos), shift(k2, sin, cos)], -1)
        qq, kk = torch.cat([q1, q2], -1), torch.cat([k1, k2], -1)
        z = 1 / (qq @ kk.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
        kv = (k_rot.transpose(-2, -1) * N**-0.5) @ (v * N**-0.5)
        o = q_rot @ kv * z
    o = o.transpose(1, 2).reshape(B, N, C) + lepe
    return m.out_proj(m.ln(o) * F.silu(g))


@pytest.mark.parametrize("heads,hw,prefix", [(2, (7, 9), 0), (4, (5, 4), 2), (8, (3, 3), 1)])
def test_matches_official_forward(heads, hw, prefix):
    m = NormAwareLinearAttn(DIM, heads)
    x = 0.5 * torch.randn(2, prefix + hw[0] * hw[1], DIM)
    assert rel_err(m(x, hw, prefix), reference(m, x, hw, prefix)) < 1e-5


@pytest.mark.parametrize("hw,prefix", [((6, 5), 0), ((3, 4), 1)])
def test_softmax_variant_matches_official_forward(hw, prefix):
    m = VanillaSelfAttention(DIM, HEADS)
    x = torch.randn(2, prefix + hw[0] * hw[1], DIM)
    assert rel_err(m(x, hw, prefix), reference(m, x, hw, prefix, softmax=True)) < 1e-5


def test_official_parameter_names_and_registry():
    official = {"qkvg.weight", "qkvg.bias", "lepe.weight", "lepe.bias", "out_proj.weight", "out_proj.bias",
                "ln.weight", "ln.bias"}
    for name, cls in (("nala", NormAwareLinearAttn), ("nala_softmax", VanillaSelfAttention)):
        m = linvision.create_mixer(name, dim=64, num_heads=4)
        assert isinstance(m, cls) and set(m.state_dict()) == official
        assert m.qkvg.weight.shape == (256, 64) and m.lepe.weight.shape == (64, 1, 5, 5)


# --- RoPE ------------------------------------------------------------------------------------------
def test_rope_is_a_rotation():
    sin, cos = rope_2d(16, (5, 7), num_prefix_tokens=2)
    x = torch.randn(3, 2 + 35, 16, dtype=torch.float64)
    y = apply_rope(x, sin.double(), cos.double())
    pair_norm = lambda t: t.unflatten(-1, (8, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    torch.testing.assert_close(y[:, :2], x[:, :2])  # prefix tokens: angle 0
    torch.testing.assert_close(y[:, 2], x[:, 2])  # image token (0, 0): angle 0


def test_rope_layout_rows_then_columns():
    sin, cos = rope_2d(16, (4, 6))
    assert sin.shape == (24, 16)
    x = torch.randn(16).expand(24, 16)
    y = apply_rope(x, sin, cos).reshape(4, 6, 16)
    assert torch.equal(y[2, 1, :8], y[2, 5, :8]) and not torch.allclose(y[2, 1, 8:], y[2, 5, 8:])  # same row
    assert torch.equal(y[0, 3, 8:], y[3, 3, 8:]) and not torch.allclose(y[0, 3, :8], y[3, 3, :8])  # same column
    # first angle pair: 1 rad per step (linspace starts at 0); last pair of each half: 1/10000 rad per step
    torch.testing.assert_close(sin[6 * 3, :2], torch.full((2,), math.sin(3.0)))
    torch.testing.assert_close(sin[5, 14:], torch.full((2,), math.sin(5 * 1e-4)))


def test_rope_is_relative():
    h, w = 12, 12
    sin, cos = rope_2d(16, (h, w))
    sin, cos = sin.double().reshape(h, w, 16), cos.double().reshape(h, w, 16)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def score(p, p2):
        return apply_rope(q, sin[p], cos[p]) @ apply_rope(k, sin[p2], cos[p2])

    base = score((2, 3), (5, 1))
    for dr, dc in [(1, 0), (0, 4), (6, 7), (-2, 2)]:
        torch.testing.assert_close(score((2 + dr, 3 + dc), (5 + dr, 1 + dc)), base)
    assert not torch.allclose(score((2, 3), (5, 2)), base)
    torch.testing.assert_close(score((7, 8), (7, 8)), q @ k)


@pytest.mark.parametrize("dim,heads", [(20, 2), (18, 2), (12, 4)])  # head_dim 10, 9, 3: not multiples of 4
def test_head_dim_not_multiple_of_four(dim, heads):
    d = dim // heads
    sin, cos = rope_2d(d, (3, 5))
    assert sin.shape == (15, 4 * (d // 4))
    x = torch.randn(15, d)
    assert torch.equal(apply_rope(x, sin, cos)[:, 4 * (d // 4):], x[:, 4 * (d // 4):])  # trailing dims unrotated
    m = NormAwareLinearAttn(dim, heads)
    y = m(torch.randn(1, 1 + 15, dim), (3, 5), 1)
    assert torch.isfinite(y).all()


# --- numerator-only RoPE ---------------------------------------------------------------------------
def test_rope_off_equals_rope_at_position_zero():
    """Prefix tokens and a 1×1 grid all sit at angle 0, where RoPE is the identity."""
    m = NormAwareLinearAttn(DIM, HEADS)
    m_off = NormAwareLinearAttn(DIM, HEADS, rope=False)
    m_off.load_state_dict(m.state_dict())
    x = torch.randn(2, 4 + 1, DIM)
    torch.testing.assert_close(m(x, (1, 1), 4), m_off(x, (1, 1), 4), rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 4 * 5, DIM)
    assert rel_err(m(x, (4, 5)), m_off(x, (4, 5))) > 1e-3


def test_rope_only_in_numerator():
    """With v ≡ 1 the plain normalised form returns ≈1 (weights sum to 1); numerator-only RoPE does not."""
    torch.manual_seed(1)
    B, N, H, d, hw = 1, 20, 2, 16, (4, 5)
    q, k = torch.randn(B, N, H, d), torch.randn(B, N, H, d)
    ones = torch.ones(B, N, H, d)
    plain = NormAwareLinearAttn(H * d, H, rope=False).attend(q, k, ones, hw, 0)
    torch.testing.assert_close(plain, ones, rtol=1e-4, atol=1e-4)
    m = NormAwareLinearAttn(H * d, H)
    rotated = m.attend(q, k, ones, hw, 0)
    assert (rotated - 1).abs().max() > 1e-2
    # …and the rotated form is exactly "RoPE'd numerator over plain denominator", by the quadratic form.
    phi_q, phi_k = (t.flatten(-2).double() for t in m.features(q, k))
    sin, cos = (t.double()[:, None, None, :] for t in rope_2d(d, hw))
    rq, rk = (apply_rope(t, sin, cos).flatten(-2) for t in m.features(q, k))
    num = torch.einsum("bnhe,bmhe->bnh", rq.double(), rk.double()) / N
    den = torch.einsum("bnhe,bmhe->bnh", phi_q, phi_k) / N + 1e-6
    assert rel_err(rotated[..., 0], num / den) < 1e-5


# --- numerics --------------------------------------------------------------------------------------
def test_exact_zeros_in_q_give_finite_gradients():
    m = NormAwareLinearAttn(DIM, HEADS)
    with torch.no_grad():  # every other q channel exactly 0 (the sign split adds more zeros)
        m.qkvg.weight[0:DIM:2] = 0
        m.qkvg.bias[0:DIM:2] = 0
    x = torch.randn(2, 1 + 7 * 9, DIM, requires_grad=True)
    y = m(x, (7, 9), 1)
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_all_zero_query_is_nan_unless_guarded():
    """The official q/‖q‖ has no eps: an exactly-zero query head gives NaN (reproduced); norm_eps fixes it."""
    m = NormAwareLinearAttn(DIM, HEADS)
    with torch.no_grad():
        m.qkvg.weight[: DIM // 2] = 0  # head 0 of q is zero for every token
        m.qkvg.bias[: DIM // 2] = 0
    x = torch.randn(1, 12, DIM)
    assert torch.isnan(m(x, (3, 4))).any()
    guarded = NormAwareLinearAttn(DIM, HEADS, norm_eps=1e-6)
    guarded.load_state_dict(m.state_dict())
    x.requires_grad_(True)
    y = guarded(x, (3, 4))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls", [NormAwareLinearAttn, VanillaSelfAttention])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_backward(cls, dtype):
    m = cls(DIM, HEADS).to(dtype)
    x = torch.randn(2, 1 + 7 * 9, DIM, dtype=dtype, requires_grad=True)
    y = m(x, (7, 9), 1)
    y.float().square().mean().backward()
    assert y.dtype == dtype and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    ref = cls(DIM, HEADS)
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    assert rel_err(y, ref(x.detach().float(), (7, 9), 1)) < 5e-2


@pytest.mark.parametrize(
    "options,match",
    [({"norm_eps": -1.0}, "norm_eps"), ({"rope": "yes"}, "rope"), ({"rope_base": 0.5}, "rope_base"),
     ({"backend": "cuda"}, "backend")],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        linvision.create_mixer("nala", dim=DIM, num_heads=HEADS, **options)

"""CLEAR as a vision mixer: locality, global prefix tokens, pooled tokens, RoPE, scale, teacher initialisation."""
import math

import pytest
import torch

import linvision
import linvision.mixers.clear as clear_module
from linvision.mixers.clear import (
    FLUX_TRAIN_SEQ_LEN,
    ClearAttention,
    apply_rope,
    clear_scale,
    rope_tables,
)
from tests.helpers import rel_err

DIM, HEADS = 32, 2


def clear(**options):
    torch.manual_seed(0)
    return linvision.create_mixer("clear", dim=DIM, num_heads=HEADS, **options)


def by_hand(m, x, hw, T):
    """CLEAR written out independently: projections, RoPE, loop pooling, explicit mask, dense softmax."""
    h, w = hw
    B, N, _ = x.shape
    d = DIM // HEADS
    q, k, v = m.qkv(x).double().reshape(B, N, 3, HEADS, d).unbind(2)
    if m.rope:
        cos, sin = rope_tables(d, hw, T, m.rope_theta, m.rope_ntk_factor)
        q, k = apply_rope(q, cos.double(), sin.double()), apply_rope(k, cos.double(), sin.double())
    keys, values = [k], [v]
    f = m.pool_factor
    if f:
        wt = m.spatial_weight.double().reshape(f, f)
        pk = torch.zeros(B, (h // f) * (w // f), HEADS, d, dtype=torch.float64)
        pv = torch.zeros_like(pk)
        for i in range(h // f):
            for j in range(w // f):
                for a in range(f):
                    for c in range(f):
                        t = T + (i * f + a) * w + (j * f + c)
                        pk[:, i * (w // f) + j] += wt[a, c] * k[:, t]
                        pv[:, i * (w // f) + j] += wt[a, c] * v[:, t]
        keys.append(pk)
        values.append(pv)
    k, v = torch.cat(keys, 1), torch.cat(values, 1)
    allowed = torch.zeros(N, k.shape[1], dtype=torch.bool)
    for i in range(N):
        for j in range(k.shape[1]):
            if i < T:
                allowed[i, j] = j < N
            elif j < T or j >= N:
                allowed[i, j] = True
            else:
                (yi, xi), (yj, xj) = divmod(i - T, w), divmod(j - T, w)
                allowed[i, j] = (yi - yj) ** 2 + (xi - xj) ** 2 < m.radius**2
    if m.train_seq_len is None:
        scale = d**-0.5
    else:
        scale = math.sqrt(math.log((10 if f else 1) * N, m.train_seq_len) / d)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    o = torch.einsum("bhnm,bmhd->bnhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), v)
    return m.proj(o.flatten(2).float())


@pytest.mark.parametrize("options,hw,T", [
    (dict(radius=2), (5, 7), 0),
    (dict(radius=3, pool_factor=2), (4, 6), 2),
    (dict(radius=2, pool_factor=2, rope=True, train_seq_len=FLUX_TRAIN_SEQ_LEN), (6, 4), 1),
    (dict(radius=3, rope=True, rope_ntk_factor=10.0, train_seq_len=30), (3, 5), 3),
])
def test_matches_the_equations(options, hw, T):
    m = clear(**options)
    if m.pool_factor:
        with torch.no_grad():
            m.spatial_weight.copy_(torch.rand_like(m.spatial_weight))
    x = torch.randn(2, T + hw[0] * hw[1], DIM)
    assert rel_err(m(x, hw=hw, num_prefix_tokens=T), by_hand(m, x, hw, T)) < 1e-5


def test_inherits_softmax_weights_and_equals_softmax_when_the_disc_covers_the_image():
    teacher = linvision.create_mixer("softmax", dim=DIM, num_heads=HEADS)
    m = clear(radius=10)
    m.load_state_dict(teacher.state_dict())  # same qkv/proj names: CLEAR starts from the teacher
    x = torch.randn(2, 1 + 6 * 7, DIM)
    assert rel_err(m(x, hw=(6, 7), num_prefix_tokens=1), teacher(x, hw=(6, 7), num_prefix_tokens=1)) < 1e-5


def test_image_tokens_outside_the_disc_have_no_influence():
    m = clear(radius=2)
    hw = (6, 6)
    x = torch.randn(1, 36, DIM)
    y = m(x, hw=hw)
    x2 = x.clone()
    x2[0, 5 * 6 + 5] += 10.0  # token (5, 5): distance² ≥ 4 from (0..3, 0..3) except its neighbours
    y2 = m(x2, hw=hw)
    changed = (y2 - y).abs().amax(-1)[0].reshape(6, 6) > 1e-6
    yy, xx = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(changed, (yy - 5) ** 2 + (xx - 5) ** 2 < 4)


def test_prefix_tokens_are_global_and_do_not_see_pooled_tokens():
    m = clear(radius=1, pool_factor=2)
    hw, T = (4, 4), 2
    x = torch.randn(1, T + 16, DIM)
    y = m(x, hw=hw, num_prefix_tokens=T)
    with torch.no_grad():
        m.spatial_weight.mul_(3.0)
    y2 = m(x, hw=hw, num_prefix_tokens=T)
    assert torch.equal(y2[:, :T], y[:, :T])  # prefix rows: no pooled keys
    assert (y2[:, T:] - y[:, T:]).abs().amax() > 1e-4  # image rows see every pooled key
    # every image token reaches the prefix outputs, and the prefix reaches every image output
    x.requires_grad_(True)
    m(x, hw=hw, num_prefix_tokens=T)[:, 0].sum().backward()
    assert (x.grad[0].abs().sum(-1) > 0).all()


def test_spatial_weight_official_shape_init_and_gradient():
    m = clear(pool_factor=4)
    assert m.spatial_weight.shape == (1, 1, 1, 4, 1, 4, 1)
    assert torch.allclose(m.spatial_weight, torch.full_like(m.spatial_weight, 1 / 16))
    assert clear(pool_factor=1).spatial_weight is None  # official --down_factor 1: no pooling
    x = torch.randn(1, 8 * 8, DIM)
    m(x, hw=(8, 8)).square().mean().backward()
    assert m.spatial_weight.grad is not None and m.spatial_weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divide"):
        m(torch.randn(1, 8 * 6, DIM), hw=(8, 6))


def test_rope_matches_diffusers_flux_pos_embed():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    d, hw, T = 16, (3, 5), 2
    ids = torch.zeros(T + 15, 2)
    ids[T:, 0] = torch.arange(3).repeat_interleave(5).float()
    ids[T:, 1] = torch.arange(5).repeat(3).float()
    cos_ref, sin_ref = FluxPosEmbed(theta=10000, axes_dim=[8, 8])(ids)
    cos, sin = rope_tables(d, hw, T)
    assert torch.allclose(cos, cos_ref) and torch.allclose(sin, sin_ref)
    x = torch.randn(2, T + 15, 3, d)
    want = apply_rotary_emb(x.transpose(1, 2), (cos_ref, sin_ref)).transpose(1, 2)
    assert rel_err(apply_rope(x, cos, sin), want) < 1e-6


def test_proportional_scale():
    d = 128
    assert clear_scale(d, 1000) == math.sqrt(1 / d)  # the official expression, bit for bit
    assert clear_scale(d, FLUX_TRAIN_SEQ_LEN, FLUX_TRAIN_SEQ_LEN) == pytest.approx(d**-0.5)
    n = 128 * 256 + 512
    assert clear_scale(d, n, FLUX_TRAIN_SEQ_LEN) == pytest.approx(math.sqrt(math.log(n, 4608) / d))
    assert clear_scale(d, n, FLUX_TRAIN_SEQ_LEN, pooled=True) == pytest.approx(math.sqrt(math.log(10 * n, 4608) / d))
    assert clear_scale(d, n, FLUX_TRAIN_SEQ_LEN, pooled=True, pooled_log_factor=1.0) == clear_scale(d, n, FLUX_TRAIN_SEQ_LEN)


def test_triton_backend_matches_torch_backend():
    hw, T = (4, 6), 1
    ms = [clear(radius=2, pool_factor=2, rope=True, backend=b) for b in ("torch", "triton")]
    ms[1].load_state_dict(ms[0].state_dict())
    x = torch.randn(1, T + 24, DIM)
    outs, grads = [], []
    for m in ms:
        xi = x.clone().requires_grad_(True)
        y = m(xi, hw=hw, num_prefix_tokens=T)
        y.square().sum().backward()
        outs.append(y)
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    assert rel_err(outs[1], outs[0]) < 1e-5
    for a, b in zip(grads[1], grads[0]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("bad", [
    dict(radius=0), dict(radius=1.5), dict(pool_factor=0), dict(rope="yes"), dict(train_seq_len=1),
    dict(pooled_log_factor=0.0), dict(backend="cuda"), dict(rope_ntk_factor=0.0),
])
def test_bad_options_raise(bad):
    with pytest.raises(ValueError):
        clear(**bad)


def test_registered_with_documented_defaults():
    m = clear()
    assert isinstance(m, ClearAttention)
    assert (m.radius, m.pool_factor, m.rope, m.train_seq_len) == (8, None, False, None)
    doc = clear_module.__doc__
    assert "2412.16112" in doc and "Huage001/CLEAR" in doc and "98e9fed" in doc and "Deviations" in doc

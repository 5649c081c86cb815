"""LINA mixer: division and subtraction forms against literal restatements, the DWC, the KV gate."""
import pytest
import torch
import torch.nn.functional as F

from linvision import create_mixer
from linvision.mixers.lina import LinaAttention
from linvision.mixers.softmax import SoftmaxAttention
from tests.helpers import rel_err


def split_qkv(m, x):
    B, N, C = x.shape
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(B, N, 3, m.num_heads, C // m.num_heads)
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) each


def lina_div_reference(m, x, hw, prefix):
    """vision_transformer_linear_decouple1_kvscale1.py::LinearAttentionDecoder.forward, layout from the call."""
    B, N, C = x.shape
    q, k, v = split_qkv(m, x)
    q, k = torch.relu(q) + 1e-6, torch.relu(k) + 1e-6
    if m.key_scale is not None:
        k, v = k * m.key_scale, v * m.value_scale
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (k.transpose(-2, -1) * N**-0.5) @ (v * N**-0.5)
    out = (q @ kv * z).transpose(1, 2).flatten(2)
    if m.dw_conv is not None:
        tail = x[:, prefix:, :].reshape(B, hw[0], hw[1], C).permute(0, 3, 1, 2)
        conv = F.conv2d(tail, m.dw_conv.weight, m.dw_conv.bias, padding=2, groups=C).reshape(B, C, -1).permute(0, 2, 1)
        out = out + torch.cat([torch.zeros(B, prefix, C), conv], dim=1)
    return F.linear(out, m.proj.weight, m.proj.bias)


def lina_sub_reference(m, x):
    """vision_transformer_linear9.py::Attention.forward (InLine subtraction)."""
    B, N, C = x.shape
    q, k, v = split_qkv(m, x)
    q, k = torch.relu(q), torch.relu(k)
    scale = (C // m.num_heads) ** -0.5
    kv = (k.transpose(-2, -1) * (scale / N) ** 0.5) @ (v * (scale / N) ** 0.5)
    out = q @ kv + (1 - q @ k.mean(dim=2, keepdim=True).transpose(-2, -1) * scale) * v.mean(dim=2, keepdim=True)
    return F.linear(out.transpose(1, 2).reshape(B, N, C), m.proj.weight, m.proj.bias)


def randomize_gate(m):
    with torch.no_grad():
        m.key_scale.uniform_(0.2, 2.0)
        m.value_scale.normal_()


@pytest.mark.parametrize("dwc,gate", [(False, False), (True, False), (True, True)])
def test_division_form_matches_literal_restatement(dwc, gate):
    hw, prefix = (3, 5), 2
    m = LinaAttention(32, num_heads=4, dwc=dwc, kv_gate=gate, gate_tokens=17, gate_prefix_tokens=2, gate_grid=(3, 5))
    if gate:
        randomize_gate(m)
    x = torch.randn(2, 17, 32)
    assert rel_err(m(x, hw, prefix), lina_div_reference(m, x, hw, prefix)) < 1e-5


def test_official_c2i_layout():
    """The paper's decoder at its trained layout: 64 condition tokens + 16×16 image tokens, gate (1, H, 320, 1)."""
    m = LinaAttention(16, num_heads=2, kv_gate=True)
    assert m.key_scale.shape == (1, 2, 320, 1) and torch.equal(m.value_scale, torch.ones(1, 2, 320, 1))
    assert set(m.state_dict()) == {
        "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "dw_conv.weight", "dw_conv.bias", "key_scale", "value_scale"
    }  # fmt: skip
    assert m.dw_conv.weight.shape == (16, 1, 5, 5)
    randomize_gate(m)
    x = torch.randn(1, 320, 16)
    assert rel_err(m(x, (16, 16), 64), lina_div_reference(m, x, (16, 16), 64)) < 1e-5
    with pytest.raises(ValueError, match="gate_tokens=320"):
        m(torch.randn(1, 64 + 81, 16), (9, 9), 64)


def test_subtraction_form_matches_literal_restatement():
    m = LinaAttention(32, num_heads=4, normalization="sub", dwc=False)
    x = torch.randn(2, 21, 32)
    assert rel_err(m(x, (4, 5), 1), lina_sub_reference(m, x)) < 1e-5


@pytest.mark.parametrize("normalization,eps", [("sub", None), ("div", 0.0)])
def test_weights_sum_to_one(normalization, eps):
    """With V constant per channel (and no DWC, identity proj) the output is that constant."""
    C = 16
    m = LinaAttention(C, num_heads=2, normalization=normalization, eps=eps, dwc=False)
    const = torch.randn(C)
    with torch.no_grad():
        m.qkv.weight[2 * C :] = 0
        m.qkv.bias[2 * C :] = const
        m.proj.weight.copy_(torch.eye(C))
        m.proj.bias.zero_()
    y = m(torch.randn(2, 30, C) * 3, (5, 6))
    assert rel_err(y, const.expand_as(y)) < 1e-5


def test_interpolated_gate_equals_strict_gate_at_trained_size():
    strict = LinaAttention(32, num_heads=4, kv_gate=True, gate_tokens=2 + 15, gate_prefix_tokens=2, gate_grid=(3, 5))
    randomize_gate(strict)
    interp = LinaAttention(
        32, num_heads=4, kv_gate=True, gate_tokens=17, gate_prefix_tokens=2, gate_grid=(3, 5), gate_resize="interpolate"
    )
    interp.load_state_dict(strict.state_dict())
    for a, b in zip(strict.kv_gate_weights((3, 5), 2), interp.kv_gate_weights((3, 5), 2)):
        assert torch.equal(a, b) and a.shape == (17, 4)
    x = torch.randn(2, 17, 32)
    assert rel_err(interp(x, (3, 5), 2), strict(x, (3, 5), 2)) < 1e-7


def test_interpolated_gate_at_other_sizes():
    m = LinaAttention(16, num_heads=2, kv_gate=True, gate_tokens=1 + 16, gate_prefix_tokens=1, gate_resize="interpolate")
    assert m.gate_grid == (4, 4)
    with torch.no_grad():  # prefix entry random, grid part constant per head
        m.key_scale[:, :, 1:] = torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
        m.value_scale[:, :, 1:] = torch.tensor([-1.0, 3.0]).view(1, 2, 1, 1)
        m.key_scale[:, :, 0] = torch.tensor([[7.0], [9.0]])
    for hw in ((7, 9), (2, 3), (4, 4)):
        kw, vw = m.kv_gate_weights(hw, 1)
        assert kw.shape == vw.shape == (1 + hw[0] * hw[1], 2)
        assert torch.equal(kw[0], torch.tensor([7.0, 9.0]))  # prefix entries kept per position
        assert torch.allclose(kw[1:], torch.tensor([0.5, 2.0]).expand(hw[0] * hw[1], 2))  # constants stay constant
        assert torch.allclose(vw[1:], torch.tensor([-1.0, 3.0]).expand(hw[0] * hw[1], 2))
    x = torch.randn(1, 1 + 63, 16, requires_grad=True)
    m(x, (7, 9), 1).sum().backward()
    assert m.key_scale.grad is not None and torch.isfinite(m.key_scale.grad).all()
    with pytest.raises(ValueError, match="prefix"):
        m(torch.randn(1, 63, 16), (7, 9), 0)


def test_post_norm_is_layernorm_of_the_output():
    plain = LinaAttention(32, num_heads=4)
    normed = LinaAttention(32, num_heads=4, post_norm=True)
    with torch.no_grad():
        normed.norm.weight.normal_()
        normed.norm.bias.normal_()
    normed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 1 + 20, 32)
    assert rel_err(normed(x, (4, 5), 1), normed.norm(plain(x, (4, 5), 1))) < 1e-6


def test_from_softmax_and_split_q_kv_checkpoint():
    teacher = SoftmaxAttention(32, num_heads=4)
    m = LinaAttention.from_softmax(teacher, normalization="sub", dwc=False)
    assert torch.equal(m.qkv.weight, teacher.qkv.weight) and torch.equal(m.proj.bias, teacher.proj.bias)
    # vision_transformer_linear9.py stores q = Linear(C, C) and kv = Linear(C, 2C) (rows [k; v]).
    split = {"q.weight": teacher.qkv.weight[:32], "q.bias": teacher.qkv.bias[:32]}
    split.update({"kv.weight": teacher.qkv.weight[32:], "kv.bias": teacher.qkv.bias[32:]})
    split.update({"proj.weight": teacher.proj.weight, "proj.bias": teacher.proj.bias})
    loaded = LinaAttention(32, num_heads=4, normalization="sub", dwc=False)
    loaded.load_state_dict(split)
    x = torch.randn(1, 12, 32)
    assert torch.equal(loaded(x, (3, 4)), m(x, (3, 4)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_backward(dtype):
    m = create_mixer("lina", dim=32, num_heads=2, kv_gate=True, gate_tokens=3 + 35, gate_prefix_tokens=3, gate_grid=(5, 7))
    x = torch.randn(2, 3 + 35, 32)
    ref = m(x, (5, 7), 3)
    xl = x.to(dtype).requires_grad_()
    y = m.to(dtype)(xl, (5, 7), 3)
    y.float().square().sum().backward()
    assert y.dtype == dtype and torch.isfinite(xl.grad).all()
    assert rel_err(y, ref) < 3e-2


@pytest.mark.parametrize(
    "kwargs",
    [
        {"normalization": "mul"},
        {"normalization": "sub", "eps": 1e-6},
        {"eps": -1.0},
        {"dwc_kernel_size": 2},
        {"gate_resize": "nearest"},
        {"gate_tokens": 0},
        {"gate_prefix_tokens": 320},
        {"kv_gate": True, "gate_resize": "interpolate", "gate_tokens": 17, "gate_prefix_tokens": 2},  # 15 not square
        {"kv_gate": True, "gate_resize": "interpolate", "gate_tokens": 17, "gate_prefix_tokens": 2, "gate_grid": (4, 4)},
        {"backend": "gpu"},
    ],
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        create_mixer("lina", dim=32, num_heads=4, **kwargs)


@pytest.mark.parametrize("normalization", ["div", "sub"])
def test_triton_backend_matches_torch_with_gate(normalization):
    """The KV gate and the subtraction form through the Triton kernel (interpreted on CPU)."""
    pytest.importorskip("triton")
    m = LinaAttention(
        32, num_heads=2, normalization=normalization, kv_gate=True, gate_tokens=16, gate_prefix_tokens=1,
        gate_grid=(3, 5), gate_resize="interpolate",
    )  # fmt: skip
    randomize_gate(m)
    x = torch.randn(2, 1 + 20, 32)
    ref = m(x, (4, 5), 1)
    m.backend = "triton"
    assert rel_err(m(x, (4, 5), 1), ref) < 1e-5

"""LiT mixer: the forward against a literal restatement, the DWC layouts, weight inheritance."""
import pytest
import torch
import torch.nn.functional as F

from linvision import create_mixer
from linvision.mixers.lit import LiTAttention
from linvision.mixers.softmax import SoftmaxAttention
from tests.helpers import rel_err


def lit_reference(m, x, hw, prefix):
    """LiT's forward written out as in the author's code: (B, H, N, d) tensors, explicit mean and N^-½."""
    B, N, C = x.shape
    H, d = m.num_heads, C // m.num_heads
    h, w = hw
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = torch.relu(q) + 1e-6, torch.relu(k) + 1e-6
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-6)
    kv = (k.transpose(-2, -1) * N**-0.5) @ (v * N**-0.5)
    out = (q @ kv * z).transpose(1, 2).reshape(B, N, C)
    v_img = v[:, :, prefix:]  # (B, H, hw, d)
    if m.dwc_shared_across_heads:
        grid = v_img.reshape(B * H, h, w, d).permute(0, 3, 1, 2)
        conv = F.conv2d(grid, m.dwc.weight, m.dwc.bias, padding=2, groups=d).reshape(B, C, h * w).permute(0, 2, 1)
    else:
        grid = v_img.permute(0, 2, 1, 3).reshape(B, h * w, C).permute(0, 2, 1).reshape(B, C, h, w)
        conv = F.conv2d(grid, m.dwc.weight, m.dwc.bias, padding=2, groups=C).reshape(B, C, h * w).permute(0, 2, 1)
    out = out + torch.cat([torch.zeros(B, prefix, C), conv], dim=1)
    return F.linear(out, m.proj.weight, m.proj.bias)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("hw,prefix", [((7, 9), 0), ((5, 3), 2)])
def test_forward_matches_literal_restatement(shared, hw, prefix):
    m = LiTAttention(32, num_heads=4, dwc_shared_across_heads=shared)
    x = torch.randn(2, prefix + hw[0] * hw[1], 32)
    assert rel_err(m(x, hw, prefix), lit_reference(m, x, hw, prefix)) < 1e-5


def test_eps_is_on_the_mean_dense_form():
    """Without the DWC, O_i = Σ_j (φq_i·φk_j) v_j / (Σ_j φq_i·φk_j + 1e-6·N): the spec's dense parity target."""
    m = LiTAttention(16, num_heads=2)
    torch.nn.init.zeros_(m.dwc.weight)
    torch.nn.init.zeros_(m.dwc.bias)
    x = torch.randn(1, 12, 16) * 0.01  # small scores so the eps term matters
    B, N, C = x.shape
    q, k, v = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(B, N, 3, 2, 8).unbind(2)
    phi_q, phi_k = torch.relu(q) + 1e-6, torch.relu(k) + 1e-6
    scores = torch.einsum("bnhd,bmhd->bhnm", phi_q, phi_k)
    o = torch.einsum("bhnm,bmhd->bnhd", scores, v) / (scores.sum(-1).transpose(1, 2).unsqueeze(-1) + 1e-6 * N)
    ref = F.linear(o.reshape(B, N, C), m.proj.weight, m.proj.bias)
    assert rel_err(m(x, (3, 4)), ref) < 1e-5


def test_dwc_layouts_and_prefix_tokens():
    shared, per_channel = LiTAttention(32, 4), LiTAttention(32, 4, dwc_shared_across_heads=False)
    assert shared.dwc.weight.shape == (8, 1, 5, 5) and per_channel.dwc.weight.shape == (32, 1, 5, 5)
    # Prefix tokens get no DWC term; their V does not enter the convolution.
    v = torch.randn(2, 3 + 20, 4, 8)
    for m in (shared, per_channel):
        local = m.local_term(v, (4, 5), 3)
        assert local.shape == (2, 23, 32) and torch.equal(local[:, :3], torch.zeros(2, 3, 32))
        v2 = v.clone()
        v2[:, :3] = 100.0
        assert torch.equal(m.local_term(v2, (4, 5), 3), local)


def test_from_softmax_copies_weights_exactly():
    teacher = SoftmaxAttention(32, num_heads=4)
    lit = LiTAttention.from_softmax(teacher)
    assert isinstance(lit, LiTAttention) and lit.num_heads == 4
    for name in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
        assert torch.equal(lit.state_dict()[name], teacher.state_dict()[name])
    few = LiTAttention.from_softmax(teacher, num_heads=1, dwc_shared_across_heads=False)
    assert few.num_heads == 1 and torch.equal(few.qkv.weight, teacher.qkv.weight)
    assert few(torch.randn(1, 9, 32), (3, 3)).shape == (1, 9, 32)
    reinit = LiTAttention.from_softmax(teacher, inherit="proj")  # the paper's guideline 4
    assert not torch.equal(reinit.qkv.weight, teacher.qkv.weight)
    assert torch.equal(reinit.proj.weight, teacher.proj.weight)
    none = LiTAttention.from_softmax(teacher, inherit="none")
    assert not torch.equal(none.proj.weight, teacher.proj.weight)


def test_from_softmax_timm_and_diffusers():
    from timm.layers import Attention

    timm_attn = Attention(32, num_heads=4, qkv_bias=False).to(torch.float64)
    lit = LiTAttention.from_softmax(timm_attn)
    assert lit.qkv.bias is None and lit.qkv.weight.dtype == torch.float64
    assert torch.equal(lit.qkv.weight, timm_attn.qkv.weight) and torch.equal(lit.proj.bias, timm_attn.proj.bias)
    with pytest.raises(ValueError, match="q_norm"):
        LiTAttention.from_softmax(Attention(32, num_heads=4, qk_norm=True, norm_layer=torch.nn.LayerNorm))

    from diffusers.models.attention_processor import Attention as DiffusersAttention

    d_attn = DiffusersAttention(query_dim=32, heads=4, dim_head=8, bias=True)
    lit = LiTAttention.from_softmax(d_attn)
    assert torch.equal(lit.qkv.weight, torch.cat([d_attn.to_q.weight, d_attn.to_k.weight, d_attn.to_v.weight]))
    assert torch.equal(lit.qkv.bias[32:64], d_attn.to_k.bias) and torch.equal(lit.proj.weight, d_attn.to_out[0].weight)
    with pytest.raises(ValueError, match="cross"):
        LiTAttention.from_softmax(DiffusersAttention(query_dim=32, cross_attention_dim=16, heads=4, dim_head=8))
    with pytest.raises(ValueError):
        LiTAttention.from_softmax(torch.nn.Linear(4, 4))


def test_split_q_kv_checkpoint_loads_into_qkv():
    src = LiTAttention(16, 2)
    split = {k: v for k, v in src.state_dict().items() if not k.startswith("qkv")}
    split.update({"q.weight": src.qkv.weight[:16], "q.bias": src.qkv.bias[:16]})
    split.update({"kv.weight": src.qkv.weight[16:], "kv.bias": src.qkv.bias[16:]})
    dst = LiTAttention(16, 2)
    dst.load_state_dict(split)
    assert torch.equal(dst.qkv.weight, src.qkv.weight) and torch.equal(dst.qkv.bias, src.qkv.bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_backward(dtype):
    m = create_mixer("lit", dim=32, num_heads=2)
    x = torch.randn(2, 1 + 35, 32)
    ref = m(x, (5, 7), 1)
    xl = x.to(dtype).requires_grad_()
    y = m.to(dtype)(xl, (5, 7), 1)
    y.float().square().sum().backward()
    assert y.dtype == dtype and torch.isfinite(xl.grad).all()
    assert rel_err(y, ref) < 3e-2


@pytest.mark.parametrize(
    "kwargs",
    [{"dwc_kernel_size": 4}, {"dwc_kernel_size": 0}, {"eps": -1.0}, {"backend": "cuda"}, {"num_heads": 5}],
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        create_mixer("lit", dim=32, **kwargs)
    with pytest.raises(ValueError):
        LiTAttention.from_softmax(SoftmaxAttention(32, 4), inherit="qkv")

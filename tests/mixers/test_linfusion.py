"""LinFusion mixer: the forward against a literal restatement, the published key layout, teacher copy."""
import pytest
import torch
import torch.nn.functional as F

from linvision import create_mixer
from linvision.mixers.linfusion import LinFusionAttention
from linvision.mixers.softmax import SoftmaxAttention
from tests.helpers import rel_err


def linfusion_reference(m, x):
    """GeneralizedLinearAttention.forward written out on [B·H, N, d], as in the official code."""
    B, N, C = x.shape
    H, d = m.num_heads, C // m.num_heads

    def mlp(seq, t):
        if isinstance(seq, torch.nn.Identity):
            return t
        t = F.linear(t, seq[0].weight, seq[0].bias)
        t = F.layer_norm(t, (t.shape[-1],), seq[1].weight, seq[1].bias, 1e-5)
        t = F.leaky_relu(t, 0.01)
        return F.linear(t, seq[3].weight, seq[3].bias)

    def head_to_batch(t):
        return t.reshape(B, N, H, d).permute(0, 2, 1, 3).reshape(B * H, N, d)

    query = head_to_batch(F.linear(x + mlp(m.to_q_, x), m.to_q.weight))
    key = head_to_batch(F.linear(x + mlp(m.to_k_, x), m.to_k.weight))
    value = head_to_batch(F.linear(x, m.to_v.weight))
    query, key = F.elu(query) + 1.0, F.elu(key) + 1.0
    z = query @ key.mean(dim=-2, keepdim=True).transpose(-2, -1) + 1e-4
    kv = (key.transpose(-2, -1) * N**-0.5) @ (value * N**-0.5)
    out = (query @ kv / z).reshape(B, H, N, d).permute(0, 2, 1, 3).reshape(B, N, C)
    return F.linear(out, m.to_out[0].weight, m.to_out[0].bias)


@pytest.mark.parametrize("mid", [None, 4, -1])
def test_forward_matches_literal_restatement(mid):
    m = LinFusionAttention(64, num_heads=4, projection_mid_dim=mid)
    x = torch.randn(2, 63, 64)
    assert rel_err(m(x, (7, 9)), linfusion_reference(m, x)) < 1e-5
    x = torch.randn(1, 12, 64) * 0.02  # small activations: the 1e-4-on-the-mean term matters
    assert rel_err(m(x, (3, 4)), linfusion_reference(m, x)) < 1e-5


def test_no_spatial_term_prefix_tokens_are_ordinary_tokens():
    m = LinFusionAttention(32, num_heads=2)
    x = torch.randn(2, 1 + 12, 32)
    assert torch.equal(m(x, (3, 4), 1), m(x, (13, 1), 0))


PUBLISHED_KEYS = {
    "to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias",
    *(f"{mlp}.{i}.{p}" for mlp in ("to_q_", "to_k_") for i in (0, 1, 3) for p in ("weight", "bias")),
}  # fmt: skip


def test_state_dict_matches_published_layout():
    C = 64
    m = LinFusionAttention(C, num_heads=4)
    sd = m.state_dict()
    assert set(sd) == PUBLISHED_KEYS
    assert sd["to_q_.0.weight"].shape == (C, C) and sd["to_q_.1.weight"].shape == (C,)
    xl = LinFusionAttention(C, num_heads=4, projection_mid_dim=C // 16).state_dict()  # SDXL's mid dim
    assert xl["to_k_.0.weight"].shape == (4, C) and xl["to_k_.1.bias"].shape == (4,) and xl["to_k_.3.weight"].shape == (C, 4)
    assert set(LinFusionAttention(C, 4, projection_mid_dim=-1).state_dict()) == {
        k for k in PUBLISHED_KEYS if not k.startswith(("to_q_", "to_k_"))
    }
    act = m.to_q_[2]
    assert isinstance(act, torch.nn.LeakyReLU) and act.negative_slope == 0.01 and not act.inplace
    # A LinFusion checkpoint stores module i under the prefix "i."; the sub-dict loads as it is.
    ckpt = {f"3.{k}": torch.randn_like(v) for k, v in sd.items()}
    m.load_state_dict({k[2:]: v for k, v in ckpt.items()})
    assert torch.equal(m.to_q_[3].weight, ckpt["3.to_q_.3.weight"])


def test_layout_matches_diffusers_attention_and_teacher_copy():
    from diffusers.models.attention_processor import Attention

    C, heads = 32, 4
    teacher = Attention(query_dim=C, out_dim=C, dim_head=C // heads)  # as LinFusion builds its modules
    m = LinFusionAttention(C, num_heads=heads)
    result = m.load_state_dict(teacher.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) == {k for k in PUBLISHED_KEYS if k.startswith(("to_q_", "to_k_"))}

    student = LinFusionAttention.from_softmax(teacher, projection_mid_dim=8)
    assert student.num_heads == heads and student.to_q_[0].out_features == 8
    for name in ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "to_out.0.bias"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    fresh = LinFusionAttention.from_softmax(teacher, copy_weights=False)
    assert not torch.equal(fresh.to_q.weight, teacher.to_q.weight)
    with pytest.raises(ValueError, match="cross"):
        LinFusionAttention.from_softmax(Attention(query_dim=C, cross_attention_dim=16, heads=heads, dim_head=8))
    with pytest.raises(ValueError, match="read from"):
        LinFusionAttention.from_softmax(teacher, num_heads=2)


def test_from_fused_qkv_softmax():
    teacher = SoftmaxAttention(32, num_heads=4)
    m = LinFusionAttention.from_softmax(teacher)
    assert torch.equal(m.to_k.weight, teacher.qkv.weight[32:64]) and torch.equal(m.to_v.bias, teacher.qkv.bias[64:])
    assert torch.equal(m.to_out[0].weight, teacher.proj.weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_backward(dtype):
    m = create_mixer("linfusion", dim=32, num_heads=2)
    x = torch.randn(2, 2 + 35, 32)
    ref = m(x, (5, 7), 2)
    xl = x.to(dtype).requires_grad_()
    y = m.to(dtype)(xl, (5, 7), 2)
    y.float().square().sum().backward()
    assert y.dtype == dtype and torch.isfinite(xl.grad).all()
    assert rel_err(y, ref) < 3e-2


@pytest.mark.parametrize(
    "kwargs", [{"projection_mid_dim": 0}, {"projection_mid_dim": -2}, {"eps": -1.0}, {"dropout": 1.5}, {"backend": "x"}]
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        create_mixer("linfusion", dim=32, num_heads=4, **kwargs)

"""What makes the two baselines themselves."""
import pytest
import timm.layers
import torch
import torch.nn.functional as F

import linvision
from linvision.kernels.linear_attn import naive
from tests.helpers import rel_err


def test_softmax_equals_timm_attention_with_the_same_weights():
    ours = linvision.create_mixer("softmax", dim=48, num_heads=3)
    ref = timm.layers.Attention(48, num_heads=3, qkv_bias=True)
    ref.load_state_dict(ours.state_dict())  # same parameter names: weights load as they are
    x = torch.randn(2, 1 + 5 * 7, 48)
    assert rel_err(ours(x, hw=(5, 7), num_prefix_tokens=1), ref(x)) < 1e-6


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_linear_equals_explicit_normalised_attention(feature_map):
    m = linvision.create_mixer("linear", dim=32, num_heads=2, feature_map=feature_map, eps=1e-6)
    x = torch.randn(2, 2 + 6 * 5, 32, dtype=torch.float64)
    m = m.double()
    q, k, v = m.qkv(x).reshape(2, -1, 3, 2, 16).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
    phi = (lambda t: F.elu(t) + 1) if feature_map == "elu" else F.relu
    a = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, N, N)
    o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    ref = m.proj(o.transpose(1, 2).flatten(2))
    assert rel_err(m(x, hw=(6, 5), num_prefix_tokens=2), ref) < 1e-12


def test_linear_streaming_inference_over_many_chunks(monkeypatch):
    """The no-grad path streams token chunks; with tiny chunks it must equal the autograd path."""
    monkeypatch.setattr(naive, "CHUNK_ELEMENTS", 256)
    m = linvision.create_mixer("linear", dim=32, num_heads=2)
    x = torch.randn(2, 1 + 23 * 17, 32)
    full = m(x, hw=(23, 17), num_prefix_tokens=1)
    with torch.no_grad():
        streamed = m(x, hw=(23, 17), num_prefix_tokens=1)
    assert rel_err(streamed, full) < 1e-6


def test_linear_feature_map_validated():
    with pytest.raises(ValueError, match="feature_map"):
        linvision.create_mixer("linear", dim=32, num_heads=2, feature_map="softplus")
    with pytest.raises(ValueError, match="backend"):
        linvision.create_mixer("linear", dim=32, num_heads=2, backend="cuda")

"""Chunk-by-chunk feature callbacks (``linear_attention_streamed``, ``additive_scan_streamed``) give the
outputs of the full-tensor calls bit for bit, across several chunks, and keep their argument checks."""
import math

import pytest
import torch

from linvision.kernels.additive_recurrence import additive_scan, additive_scan_streamed
from linvision.kernels.additive_recurrence import naive as additive_naive
from linvision.kernels.linear_attn import linear_attention
from linvision.kernels.linear_attn import naive as linear_naive
from linvision.kernels.linear_attn.streamed import linear_attention_streamed


def _rows(t):
    return None if t is None else (lambda a, b: t[:, a:b])


@pytest.fixture
def small_chunks(monkeypatch):
    """64-token chunks (the minimum), so that N = 150 spans three of them."""
    monkeypatch.setattr(linear_naive, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(additive_naive, "CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize,den,feature_map", [
    ("div", False, None), ("div", True, None), ("none", False, "elu+1"), ("sub", True, "relu"), ("div", False, "relu"),
])
def test_linear_attention_streamed_is_bit_identical(small_chunks, dtype, normalize, den, feature_map):
    torch.manual_seed(0)
    B, N, H = 2, 150, 3
    q, k = torch.randn(B, N, H, 6, dtype=dtype), torch.randn(B, N, H, 6, dtype=dtype)
    v = torch.randn(B, N, H, 5, dtype=dtype)
    if feature_map is None:
        q, k = q.abs(), k.abs()
    qd, kd = (torch.rand(B, N, H, 4, dtype=dtype), torch.rand(B, N, H, 4, dtype=dtype)) if den else (None, None)
    opts = dict(normalize=normalize, mean=True, eps=1e-6, feature_map=feature_map)
    ref = linear_attention(q, k, v, q_den=qd, k_den=kd, backend="torch", **opts)
    calls = []

    def side(t, td):
        def of(a, b):
            calls.append(b - a)
            return t[:, a:b], None if td is None else td[:, a:b]
        return of

    got = linear_attention_streamed(side(q, qd), side(k, kd), v, N, backend="torch", **opts)
    assert torch.equal(got, ref) and got.dtype == dtype
    assert max(calls) <= 64 and len(calls) == 6  # three key chunks, three query chunks: never the whole sequence


def test_linear_attention_streamed_checks_its_arguments():
    q, k, v = torch.rand(1, 8, 2, 4), torch.rand(1, 8, 2, 4), torch.rand(1, 8, 2, 4)
    feats = lambda t: (lambda a, b: (t[:, a:b], None))  # noqa: E731
    with pytest.raises(ValueError, match="normalize"):
        linear_attention_streamed(feats(q), feats(k), v, 8, normalize="bad")
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention_streamed(feats(q), feats(k), v, 8, feature_map="gelu")
    with pytest.raises(ValueError):
        linear_attention_streamed(feats(q), feats(torch.rand(1, 8, 3, 4)), v, 8)  # head counts differ


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("modulated,lse_init", [(False, -math.inf), (True, -math.inf), (True, 0.0)])
def test_additive_scan_streamed_is_bit_identical(small_chunks, dtype, modulated, lse_init):
    torch.manual_seed(1)
    B, N, H = 2, 150, 2
    q, k, v = torch.randn(B, N, H, 6, dtype=dtype), 3 * torch.randn(B, N, H, 6, dtype=dtype), torch.randn(B, N, H, 5, dtype=dtype)
    k_mod = torch.randn(1, N, H, 6, dtype=dtype) if modulated else None
    ref = additive_scan(q, k, v, k_mod=k_mod, lse_init=lse_init, out_dtype=torch.float64, backend="torch")
    keys = lambda a, b: (k[:, a:b], None if k_mod is None else k_mod[:, a:b])  # noqa: E731
    got = additive_scan_streamed(lambda a, b: q[:, a:b], keys, v, N, lse_init=lse_init, out_dtype=torch.float64,
                                 backend="torch")
    assert torch.equal(got, ref) and got.dtype == torch.float64
    with pytest.raises(ValueError):
        additive_scan_streamed(lambda a, b: q[:, a:b, :1], keys, v, N)  # head counts differ


@pytest.mark.parametrize("normalize", ["sub", "div"])
def test_linear_attention_streamed_weights_scale_offset_and_epilogue(small_chunks, normalize):
    torch.manual_seed(2)
    B, N, H = 2, 150, 2
    q, k, v = torch.randn(B, N, H, 4), torch.randn(B, N, H, 4), torch.randn(B, N, H, 3)
    kw, vw = torch.rand(N, H), torch.rand(1, N, H)  # broadcast views, as LINA's KV gate
    scale = 0.7 if normalize == "sub" else None
    opts = dict(k_weight=kw, v_weight=vw, normalize=normalize, mean=True, scale=scale, feature_map="relu",
                feature_offset=1e-6)
    ref = linear_attention(q, k, v, backend="torch", **opts)
    feats = lambda t: (lambda a, b: (t[:, a:b], None))  # noqa: E731
    got = linear_attention_streamed(feats(q), feats(k), v, N, backend="torch", **opts)
    assert torch.equal(got, ref)
    spans = []
    out = linear_attention_streamed(feats(q), feats(k), v, N, backend="torch",
                                    output=lambda a, b, o: (spans.append((a, b)), o.flatten(2) * 2)[1], **opts)
    assert torch.equal(out, ref.flatten(2) * 2) and spans == [(0, 64), (64, 128), (128, 150)]
    with pytest.raises(ValueError, match="scale"):
        linear_attention_streamed(feats(q), feats(k), v, N, normalize="div", scale=0.5)


def test_values_as_a_function_of_a_token_range(small_chunks):
    """``v(a, b)`` with ``num_keys``: asked only for chunks (never the whole sequence beyond one probe token), the
    outputs of the tensor form bit for bit, in both streamed functions; ``num_keys`` missing or wrong is an error.
    The additive scan's epilogue is applied per chunk too."""
    torch.manual_seed(3)
    B, N, H = 2, 150, 2
    q, k, v = torch.randn(B, N, H, 4).abs(), torch.randn(B, N, H, 4).abs(), torch.randn(B, N, H, 3)
    asked = []

    def values(a, b):
        asked.append(b - a)
        return v[:, a:b]

    feats = lambda t: (lambda a, b: (t[:, a:b], None))  # noqa: E731
    ref = linear_attention(q, k, v, backend="torch", mean=True)
    got = linear_attention_streamed(feats(q), feats(k), values, N, num_keys=N, mean=True, backend="torch")
    assert torch.equal(got, ref) and max(asked) <= 64
    asked.clear()
    ref = additive_scan(q, k, v, out_dtype=torch.float64, backend="torch")
    spans = []
    got = additive_scan_streamed(lambda a, b: q[:, a:b], lambda a, b: (k[:, a:b], None), values, N, num_keys=N,
                                 out_dtype=torch.float64, backend="torch",
                                 output=lambda a, b, o: (spans.append((a, b)), o * 2)[1])
    assert torch.equal(got, ref * 2) and max(asked) <= 64 and spans == [(0, 64), (64, 128), (128, 150)]
    for call in (lambda **kw: linear_attention_streamed(feats(q), feats(k), values, N, **kw),
                 lambda **kw: additive_scan_streamed(lambda a, b: q[:, a:b], lambda a, b: (k[:, a:b], None), values,
                                                     N, **kw)):
        with pytest.raises(ValueError, match="num_keys is required"):
            call()
    with pytest.raises(ValueError, match="does not match"):
        linear_attention_streamed(feats(q), feats(k), v, N, num_keys=N - 1)


def test_out_buffer_is_written_and_refused_under_autograd(small_chunks):
    torch.manual_seed(4)
    B, N, H = 1, 150, 2
    q, k, v = torch.rand(B, N, H, 4), torch.rand(B, N, H, 4), torch.randn(B, N, H, 3)
    feats = lambda t: (lambda a, b: (t[:, a:b], None))  # noqa: E731
    ref = linear_attention(q, k, v, backend="torch")
    buf = v.clone()
    got = linear_attention_streamed(feats(q), feats(k), buf, N, backend="torch", out=buf, out_lag=N)
    assert got is buf and torch.equal(got, ref)
    with pytest.raises(ValueError, match="tokens"):
        linear_attention_streamed(feats(q), feats(k), v, N, backend="torch", out=torch.empty(B, N - 1, H, 3))
    with pytest.raises(ValueError, match="autograd"):
        linear_attention_streamed(feats(q), feats(k), v, N, backend="torch", out=torch.zeros(B, N, H, 3).requires_grad_())

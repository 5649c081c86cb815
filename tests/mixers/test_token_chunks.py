"""Token-chunked per-token work (``map_token_chunks``/``map_token_ranges``), the row-range depth-wise
convolution of token-major grids (``depthwise_conv_tokens``) and the row-range short convolutions along the
order (``short_conv_rows``) against the whole-sequence computations."""
import pytest
import torch
import torch.nn.functional as F

from linvision.mixers import token_chunks
from linvision.mixers.short_conv import bidirectional_conv, causal_conv, conv_halo, short_conv, short_conv_rows
from linvision.mixers.token_chunks import chunk_tokens, map_token_chunks, map_token_ranges, map_token_windows
from linvision.mixers.token_conv import depthwise_conv_tokens


def test_chunks_cover_every_token_once(monkeypatch):
    monkeypatch.setattr(token_chunks, "CHUNK_ELEMENTS", 1)  # 64-token chunks
    assert chunk_tokens(2, 8) == 64 and chunk_tokens(object(), 1) == 64  # a symbolic batch counts as one
    x, g = torch.randn(2, 150, 8), torch.randn(2, 150, 3, 4)
    seen = []
    out = map_token_chunks(lambda x, g: (seen.append(x.shape[1]), x * g.flatten(2).sum(-1, keepdim=True))[1], x, g)
    assert torch.equal(out, x * g.flatten(2).sum(-1, keepdim=True)) and seen == [64, 64, 22]
    ranges = []
    out = map_token_ranges(lambda a, b: (ranges.append((a, b)), x[:, a:b] + a)[1], 2, 150, 8)
    assert ranges == [(0, 64), (64, 128), (128, 150)]
    assert torch.equal(out[:, 100], x[:, 100] + 64)
    assert map_token_ranges(lambda a, b: x[:, a:b], 2, 10, 8).shape == (2, 10, 8)  # one chunk: fn's own result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("h,w,P,k", [(7, 9, 0, 5), (7, 9, 2, 3), (40, 37, 1, 5), (3, 50, 0, 7), (1, 6, 1, 3)])
def test_depthwise_conv_tokens_matches_conv2d_for_any_range(dtype, h, w, P, k):
    torch.manual_seed(0)
    B, C = 2, 8
    x = torch.randn(B, P + h * w, 3 * C, dtype=dtype)[..., C : 2 * C]  # a strided slice, as of a qkv projection
    weight, bias = torch.randn(C, 1, k, k, dtype=dtype), torch.randn(C, dtype=dtype)
    img = x[:, P:].transpose(1, 2).reshape(B, C, h, w)
    ref = F.pad(F.conv2d(img, weight, bias, padding=k // 2, groups=C).flatten(2).transpose(1, 2), (0, 0, P, 0))
    full = depthwise_conv_tokens(x, (h, w), P, weight, bias)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert full.shape == ref.shape and ((full - ref).norm() / ref.norm()).item() < tol
    for step in (1, 5, 13, 64):
        parts = [depthwise_conv_tokens(x, (h, w), P, weight, bias, a, a + step) for a in range(0, P + h * w, step)]
        # the conv of a few rows may round differently from the whole grid's (fp64 differs by 1 ulp on some CPUs)
        assert ((torch.cat(parts, 1) - full).norm() / full.norm()).item() < tol
    assert torch.equal(depthwise_conv_tokens(x, (h, w), P, weight, None)[:, :P], torch.zeros(B, P, C, dtype=dtype))


def test_chunks_under_autograd_are_concatenated_with_the_same_values_and_gradients(monkeypatch):
    """With autograd recording the chunks are split and concatenated (no per-chunk slice writes, whose backward
    would copy the whole gradient per chunk): values and gradients equal the unchunked ones."""
    monkeypatch.setattr(token_chunks, "CHUNK_ELEMENTS", 1)  # 64-token chunks: 16 of them
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5).double()
    x = torch.randn(2, 1000, 6, dtype=torch.float64, requires_grad=True)
    out = map_token_chunks(lambda t: torch.tanh(lin(t)), x)
    ref_x = x.detach().clone().requires_grad_()
    ref = torch.tanh(lin(ref_x))
    assert out.grad_fn is not None and torch.allclose(out, ref, rtol=0, atol=1e-15)
    w = torch.randn_like(ref)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.allclose(x.grad, ref_x.grad, rtol=0, atol=1e-14)
    ranges = map_token_ranges(lambda a, b: lin(x[:, a:b].detach()), 2, 1000, 6)  # parameters needing grad: cat path
    assert ranges.grad_fn is not None and ranges.shape == (2, 1000, 5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("K", [1, 2, 4])
def test_short_conv_rows_equal_the_whole_convolution_at_any_range(causal, K):
    torch.manual_seed(0)
    N, C = 37, 8
    conv = short_conv(K, C)
    x = torch.randn(2, N, 3 * C, dtype=torch.float64)[..., C : 2 * C]  # a strided slice, as of a projection
    full = (causal_conv if causal else bidirectional_conv)(x, conv)
    for step in (1, 3, 5, 36, 37, 64):  # odd N: chunks of every size meet both ends of the sequence
        parts = []
        for a in range(0, N, step):
            b = min(a + step, N)
            lo, hi = conv_halo(a, b, N, K, causal)
            assert (lo, hi) == (max(a - K + 1, 0), b if causal else min(b + K - 1, N))
            parts.append(short_conv_rows(x[:, lo:hi], conv.weight, a, b, N, causal))
        assert ((torch.cat(parts, 1) - full).abs().max() / full.abs().max()).item() < 1e-14


def test_token_windows_are_chunked_without_autograd_and_whole_with_it(monkeypatch):
    monkeypatch.setattr(token_chunks, "CHUNK_ELEMENTS", 1)  # 64-token chunks
    x = torch.randn(2, 150, 3, dtype=torch.float64)
    calls = []

    def halo_sum(a, b):  # out_t = x_{t−1} + x_t + x_{t+1}, zero past the ends: reads a row either side
        calls.append((a, b))
        w = F.pad(x, (0, 0, 1, 1))[:, a : b + 2]
        return w[:, :-2] + w[:, 1:-1] + w[:, 2:]

    ref = halo_sum(0, 150)
    calls.clear()
    assert torch.equal(map_token_windows(halo_sum, x, 150, 3), ref) and calls == [(0, 64), (64, 128), (128, 150)]
    x.requires_grad_()
    calls.clear()
    out = map_token_windows(halo_sum, x, 150, 3)
    assert calls == [(0, 150)] and out.grad_fn is not None
    with torch.no_grad():
        calls.clear()
        map_token_windows(halo_sum, x, 150, 3)
        assert len(calls) == 3


@pytest.mark.parametrize("name,options", [
    ("lit", {}), ("dydila", {}), ("dydila", {"dwc": False}), ("nala", {}), ("linear", {}), ("transnormer", {}),
    ("lina", {}), ("lightnet", {}), ("hedgehog", {}), ("linfusion", {}), ("sana", {}),
])
def test_mixers_without_autograd_equal_the_recorded_path(monkeypatch, name, options):
    """Without autograd the mixers project per range of tokens and (LiT, DyDiLA, NaLa) write their outputs into
    the values' own buffer, each chunk once the convolution no longer reads its rows; with 64-token chunks on a
    9×13 grid with prefix tokens (several chunks, a halo spanning chunks) that equals the recorded path, which holds
    whole projections and a fresh output."""
    from linvision.kernels.additive_recurrence import naive as additive_naive
    from linvision.kernels.linear_attn import naive as linear_naive
    from linvision.mixers import create_mixer

    monkeypatch.setattr(linear_naive, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(additive_naive, "CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(token_chunks, "CHUNK_ELEMENTS", 1)
    torch.manual_seed(0)
    m = create_mixer(name, dim=16, num_heads=2, **options).double()
    x = torch.randn(2, 3 + 9 * 13, 16, dtype=torch.float64)
    recorded = m(x, (9, 13), 3)
    with torch.no_grad():
        streamed = m(x, (9, 13), 3)
    assert recorded.requires_grad and not streamed.requires_grad
    assert ((streamed - recorded).norm() / recorded.norm()).item() < 1e-12

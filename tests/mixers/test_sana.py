"""SANA's linear attention: live parity with diffusers' ``SanaLinearAttnProcessor2_0``, the QK-norm option,
the overflow guard, and loading a ``SanaTransformerBlock``'s ``attn1`` as it is."""
import pytest
import torch
from diffusers.models.transformers.sana_transformer import SanaTransformerBlock

import linvision
from linvision.mixers import sana
from linvision.mixers.sana import GUARD_EXPONENT, power_of_two_guard
from tests.helpers import rel_err

DIM, HEADS = 48, 3


def sana_attn1(qk_norm, seed=0):
    """A random SANA block's self-attention (diffusers' own ``Attention`` + ``SanaLinearAttnProcessor2_0``)."""
    torch.manual_seed(seed)
    block = SanaTransformerBlock(DIM, HEADS, DIM // HEADS, num_cross_attention_heads=HEADS,
                                 cross_attention_head_dim=DIM // HEADS, cross_attention_dim=DIM,
                                 attention_bias=True, qk_norm="rms_norm_across_heads" if qk_norm else None)
    attn = block.attn1.eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norm weights and biases away from their init
    return attn


def mixer_for(attn, **options):
    m = linvision.create_mixer("sana", DIM, HEADS, qkv_bias=attn.to_q.bias is not None,
                               qk_norm=attn.norm_q is not None, **options).eval().to(attn.to_q.weight.dtype)
    m.load_state_dict(attn.state_dict())  # names as diffusers': loads as it is
    return m


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("hw,prefix", [((7, 9), 0), ((5, 4), 3)])
def test_matches_diffusers_processor_in_fp32(qk_norm, hw, prefix):
    attn = sana_attn1(qk_norm)
    m = mixer_for(attn)
    x = torch.randn(2, prefix + hw[0] * hw[1], DIM)
    with torch.no_grad():
        ref, out = attn(x), m(x, hw, prefix)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("grad", [False, True])
def test_chunks_of_tokens_give_the_one_chunk_result_and_gradients(monkeypatch, grad):
    """Keys, values, queries and outputs in chunks of 7 tokens (a shorter last one), with the guard active and its
    divisors growing from chunk to chunk: the output and the input and weight gradients of a single chunk."""
    m = mixer_for(sana_attn1(qk_norm=True)).double()
    x = torch.randn(2, 3 + 7 * 9, DIM, dtype=torch.float64)
    x[:, 40] *= 2.0 ** 30  # a late peak: the divisors grow mid-sequence
    results = []
    for step in (10 ** 6, 7):
        monkeypatch.setattr(sana, "chunk_tokens", lambda t, step=step: step)
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            y = m(xi, (7, 9), 3)
        if grad:
            grads = torch.autograd.grad(y.square().sum(), (xi, m.to_k.weight, m.to_v.weight, m.norm_q.weight))
            results.append((y.detach(),) + grads)
        else:
            results.append((y,))
    for one, chunked in zip(*results):
        assert rel_err(chunked, one) < 1e-12


def test_state_dict_keys_are_diffusers_attention_keys():
    attn = sana_attn1(qk_norm=True)
    assert set(mixer_for(attn).state_dict()) == set(attn.state_dict())
    assert {"norm_q.weight", "norm_k.weight", "to_out.0.weight"} <= set(attn.state_dict())


def test_guard_is_exact_and_inactive_on_ordinary_inputs():
    peaks = torch.tensor([0.0, 1.0, 2.0 ** GUARD_EXPONENT - 1, 2.0 ** GUARD_EXPONENT, 3e30])
    s = power_of_two_guard(peaks)
    assert s[:3].tolist() == [1.0, 1.0, 1.0]
    assert (peaks / s < 2.0 ** GUARD_EXPONENT).all() and (torch.frexp(s)[0] == 0.5).all()  # powers of two


@pytest.mark.parametrize("qk_norm", [False, True])
def test_scaled_input_is_scale_equivariant(qk_norm):
    """With the guard active (inputs of 2**40), the output is the scaled output of the unguarded input."""
    attn = sana_attn1(qk_norm)
    m = mixer_for(attn, norm_eps=1e-30)  # RMSNorm's eps would break the homogeneity at the small scale
    for lin in (m.to_q, m.to_k, m.to_v, m.to_out[0]):
        lin.bias = None  # a linear map, so y(2^40 x) = 2^40 y(x) without the norms
    x = torch.randn(1, 63, DIM, dtype=torch.float64)
    m = m.double()
    with torch.no_grad():
        small, big = m(x, (7, 9)), m(x * 2.0 ** 40, (7, 9))
    assert rel_err(big, small * 2.0 ** 40) < 1e-9  # o is 0-homogeneous in q and k, linear in v


def test_bf16_at_64k_tokens_diffusers_overflows_linvision_stays_finite():
    """bf16 activations of about 2**60 at 256×256 tokens: diffusers' fp32 sums Σ_j v_j·ReLU(k_j) overflow
    (inf/inf → NaN); the guarded sums stay finite and match the fp32 result of the same bf16 projections."""
    attn = sana_attn1(qk_norm=False).to(torch.bfloat16)
    m = mixer_for(attn)
    for lin in (m.to_q, m.to_k, m.to_v, m.to_out[0]):
        lin.bias = None  # a linear map: y(2^60 x) = 2^60 y(x)
    x = (torch.randn(1, 256 * 256, DIM) * 2.0 ** 60).to(torch.bfloat16)
    with torch.no_grad():
        ref = attn(x)
        out, small = m(x, (256, 256)), m(x * 2.0 ** -60, (256, 256))
    assert not torch.isfinite(ref).all()
    assert torch.isfinite(out).all()
    assert rel_err(out.float() * 2.0 ** -60, small.float()) < 1e-2


def test_half_precision_clips_like_diffusers():
    attn = sana_attn1(qk_norm=False).half()
    m = mixer_for(attn)
    with torch.no_grad():
        m.to_out[0].weight.mul_(1e4)
    x = torch.randn(1, 20, DIM, dtype=torch.float16) * 50
    with torch.no_grad():
        y = m(x, (4, 5))
    assert torch.isfinite(y).all() and y.abs().max() == 65504


def test_options_are_validated():
    with pytest.raises(ValueError, match="qk_norm"):
        linvision.create_mixer("sana", DIM, HEADS, qk_norm="rms_norm")
    with pytest.raises(ValueError, match="eps"):
        linvision.create_mixer("sana", DIM, HEADS, eps=-1.0)
    with pytest.raises(ValueError, match="norm_eps"):
        linvision.create_mixer("sana", DIM, HEADS, norm_eps=0.0)  # checked with or without the norms
    with pytest.raises(ValueError, match="backend"):
        linvision.create_mixer("sana", DIM, HEADS, backend="cuda")


def test_triton_backend_matches_the_reference_with_the_guard_weights():
    """The guard's per-(batch, head) key/value weights go through the Triton kernels too (interpreted on CPU)."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    ref = linvision.create_mixer("sana", DIM, HEADS, qk_norm=True)
    tri = linvision.create_mixer("sana", DIM, HEADS, qk_norm=True, backend="triton")
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 63, DIM, requires_grad=True)
    y_ref, y_tri = ref(x, (7, 9)), tri(x, (7, 9))
    (g_ref,), (g_tri,) = (torch.autograd.grad(y.square().sum(), x) for y in (y_ref, y_tri))
    assert rel_err(y_tri, y_ref) < 1e-5 and rel_err(g_tri, g_ref) < 1e-5

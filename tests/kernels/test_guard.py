"""The streamed power-of-two guard of ReLU linear attention: the state summed chunk by chunk while the divisors
grow equals, bit for bit, the state made with the final divisors from the start."""
import pytest
import torch

from linvision.kernels.linear_attn.guard import guarded_relu_state, magnitude_guard, relu_guard
from linvision.kernels.linear_attn.state import state_of


def chunks_of(k, v, step):
    return [(k[:, a:a + step], v[:, a:a + step]) for a in range(0, k.shape[1], step)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_growing_divisors_give_the_state_of_the_final_ones(dtype):
    torch.manual_seed(0)
    B, N, H, D = 2, 61, 3, 5
    big = 1.0 if dtype == torch.float16 else 2.0 ** 40  # fp16 peaks stay below 2**16: divisor 1
    k, v = torch.randn(B, N, H, D) * big, torch.randn(B, N, H, D + 2) * big
    k[0, 40, 1] *= 2.0 ** 9  # peaks that grow in later chunks, differently per (batch, head)
    v[1, 55, 2] *= -(2.0 ** 12)
    k[1, 20, 0] *= 2.0 ** 5
    k, v = k.to(dtype), v.to(dtype)
    s_k, s_v = relu_guard(k), magnitude_guard(v)
    if dtype != torch.float16:
        assert s_k.amax() > 1 and s_v.amax() > 1 and (s_k != s_k.amax()).any()  # guard active, not uniform
    whole = state_of(k, v, k_weight=(1.0 / s_k).expand(B, N, H), v_weight=(1.0 / s_v).expand(B, N, H),
                     feature_map="relu")
    for step in (7, 16, N):
        state, g_k, g_v = guarded_relu_state(chunks_of(k, v, step))
        assert torch.equal(g_k, s_k) and torch.equal(g_v, s_v)
        summed = state_of(*chunks_of(k, v, step)[0], k_weight=(1.0 / s_k).expand(B, min(step, N), H),
                          v_weight=(1.0 / s_v).expand(B, min(step, N), H), feature_map="relu")
        for kc, vc in chunks_of(k, v, step)[1:]:  # the same chunked sum order, with the final divisors throughout
            m = kc.shape[1]
            summed = summed + state_of(kc, vc, k_weight=(1.0 / s_k).expand(B, m, H),
                                       v_weight=(1.0 / s_v).expand(B, m, H), feature_map="relu")
        assert torch.equal(state.kv, summed.kv) and torch.equal(state.k_sum, summed.k_sum)
        assert torch.equal(state.v_sum, summed.v_sum) and state.count == N
        assert torch.allclose(state.kv, whole.kv, rtol=1e-5, atol=0)
        assert torch.isfinite(state.kv).all()


def test_no_chunk_is_an_error():
    with pytest.raises(ValueError, match="at least one key chunk"):
        guarded_relu_state([])

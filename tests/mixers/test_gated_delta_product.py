"""``gated_delta`` with DeltaProduct's ``num_householder`` steps: fla's parameter layout, ``n_h = 1`` unchanged,
a second step with β = 0 is the one-step block, the extra steps are used and trained."""
import torch

from linvision import create_mixer
from tests.helpers import rel_err

DIM, HEADS = 32, 2


def test_one_step_has_the_parameters_of_the_block():
    torch.manual_seed(0)
    default = create_mixer("gated_delta", DIM, HEADS)
    torch.manual_seed(0)
    one = create_mixer("gated_delta", DIM, HEADS, num_householder=1)
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in one.state_dict().items()}
    x = torch.randn(2, 35, DIM)
    with torch.no_grad():
        assert torch.equal(default(x, (5, 7)), one(x, (5, 7)))


def test_parameter_layout_follows_fla():
    m = create_mixer("gated_delta", DIM, HEADS, num_householder=3)
    assert m.qkv.weight.shape == (DIM * 7, DIM)  # [q (h d), k (n h d), v (n h d)]
    assert m.beta_proj.weight.shape == (HEADS * 3, DIM)  # (n h)
    assert m.conv_k.weight.shape == (DIM * 3, 1, 4)
    assert m.gate_proj.weight.shape == (HEADS, DIM) and m.A_log.shape == (HEADS,)  # one gate per token
    assert "num_householder=3" in repr(m)


def two_steps_from_one(one):
    """A two-step block whose first step is ``one`` and whose second step has β = 0 (sigmoid(−200) = 0 in fp32)."""
    two = create_mixer("gated_delta", DIM, HEADS, num_householder=2)
    with torch.no_grad():
        q, k, v = one.qkv.weight.split(DIM)  # qkv_bias=False (SANA's default)
        two.qkv.weight.copy_(torch.cat([q, k, torch.randn_like(k), v, torch.randn_like(v)]))
        two.beta_proj.weight.copy_(torch.cat([one.beta_proj.weight, torch.randn_like(one.beta_proj.weight)]))
        two.beta_proj.bias.copy_(torch.cat([one.beta_proj.bias, torch.full_like(one.beta_proj.bias, -200.0)]))
        two.conv_k.weight.copy_(torch.cat([one.conv_k.weight, torch.randn_like(one.conv_k.weight)]))
        for name in ("gate_proj", "output_gate", "proj"):
            getattr(two, name).load_state_dict(getattr(one, name).state_dict())
        two.A_log.copy_(one.A_log)
        two.dt_bias.copy_(one.dt_bias)
    return two


def perturbed(m):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def test_a_second_step_with_zero_beta_is_the_one_step_block():
    torch.manual_seed(0)
    one = perturbed(create_mixer("gated_delta", DIM, HEADS, order="cross"))
    two = two_steps_from_one(one)
    two.order = one.order
    x = torch.randn(2, 1 + 63, DIM)
    with torch.no_grad():
        ref, out = one(x, (7, 9), num_prefix_tokens=1), two(x, (7, 9), num_prefix_tokens=1)
    assert rel_err(out, ref) < 1e-6
    with torch.no_grad():
        two.beta_proj.bias[HEADS:] = 0.0  # the second step now writes
        assert rel_err(two(x, (7, 9), num_prefix_tokens=1), ref) > 1e-3


def test_every_step_gets_gradients_in_fp32_and_float64():
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        m = perturbed(create_mixer("gated_delta", DIM, HEADS, num_householder=2)).to(dtype)
        x = torch.randn(1, 5 * 7, DIM, dtype=dtype, requires_grad=True)
        out = m(x, (5, 7))
        assert out.dtype == dtype and torch.isfinite(out).all()
        out.square().sum().backward()
        rows = m.qkv.weight.grad.split(DIM)  # q, k1, k2, v1, v2
        assert all(r.abs().sum() > 0 for r in rows) and m.beta_proj.weight.grad[HEADS:].abs().sum() > 0
        assert m.conv_k.weight.grad[DIM:].abs().sum() > 0 and x.grad.abs().sum() > 0

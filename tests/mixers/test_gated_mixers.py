"""The gated / delta-rule mixers (gla, lion, gated_delta, kda): official parity, orders, prefix tokens,
initialisation, option validation."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linvision import create_mixer
from linvision.mixers.orders import order_index, scan_in_orders
from tests.helpers import rel_err

FIXTURES = Path(__file__).parents[1] / "fixtures"
TOL = 1e-5


def official(mechanism, case, **options):
    data = load_file(str(FIXTURES / mechanism / f"{case}.safetensors"))
    params = {k[len("param."):]: v for k, v in data.items() if k.startswith("param.")}
    hw = tuple(int(s) for s in data["arg.hw"])
    x = data["input.x"]
    mixer = create_mixer(mechanism, dim=x.shape[-1], **options)
    mixer.load_state_dict(params, strict=True)
    with torch.no_grad():
        out = mixer.eval()(x, hw, int(data["arg.num_prefix_tokens"]))
    return rel_err(out, data["output"])


@pytest.mark.parametrize("case,options", [
    ("vig_t_block", dict(num_heads=3, use_out_act=True)),
    ("vig_s_block", dict(num_heads=2, use_act_in_conv=False)),
])
def test_gla_matches_official_vig(case, options):
    assert official("gla", case, **options) < TOL


@pytest.mark.parametrize("mask", ["Lit", "Decay", "Selective"])
def test_lion_matches_official(mask):
    assert official("lion", mask.lower(), num_heads=2, mask_type=mask) < TOL


def test_orders_visit_every_token_once_prefix_first():
    idx = order_index((3, 4), "column", 2)
    assert idx.tolist() == [0, 1, 2, 6, 10, 3, 7, 11, 4, 8, 12, 5, 9, 13]
    assert order_index((3, 4), "raster", 1).tolist() == list(range(13))


def test_column_order_is_the_raster_order_of_the_transposed_grid():
    """A mixer's column scan of x equals its raster scan of the transposed image (no depth-wise conv)."""
    m = create_mixer("lion", 16, 2, order="column").eval()
    r = create_mixer("lion", 16, 2, order="raster").eval()
    r.load_state_dict(m.state_dict())
    x = torch.randn(1, 1 + 4 * 5, 16)
    xt = torch.cat([x[:, :1], x[:, 1:].reshape(1, 4, 5, 16).transpose(1, 2).reshape(1, 20, 16)], 1)
    y, yt = m(x, (4, 5), 1), r(xt, (5, 4), 1)
    torch.testing.assert_close(y[:, 1:], yt[:, 1:].reshape(1, 5, 4, 16).transpose(1, 2).reshape(1, 20, 16))


def test_cross_scan_is_the_mean_of_raster_and_column():
    x = torch.randn(2, 13, 3)
    def scan(t):
        return t.cumsum(1)
    out = scan_in_orders(scan, (x,), (3, 4), 1, "cross")
    col = order_index((3, 4), "column", 1)
    ref = (x.cumsum(1) + x[:, col].cumsum(1)[:, torch.argsort(col)]) / 2
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("name", ["gla", "lion", "gated_delta", "kda"])
def test_bad_options_raise(name):
    with pytest.raises(ValueError, match="order"):
        create_mixer(name, 32, 2, order="zigzag")
    with pytest.raises(ValueError, match="chunk_size"):
        create_mixer(name, 32, 2, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        create_mixer(name, 32, 2, backend="cuda")


def test_lion_and_gla_option_checks():
    with pytest.raises(ValueError, match="mask_type"):
        create_mixer("lion", 32, 2, mask_type="selective")
    with pytest.raises(ValueError, match="expand_v"):
        create_mixer("gla", 32, 2, expand_v=2.0)
    with pytest.raises(ValueError, match="key dim"):
        create_mixer("gla", 36, 4, expand_k=0.5)


@pytest.mark.parametrize("case", ["init", "perturbed", "perturbed_no_prefix"])
def test_gated_delta_matches_official_sana(case):
    assert official("gated_delta", case, num_heads=2, key_norm="official") < TOL


def test_gated_delta_unit_keys_stay_bounded_where_the_official_scaling_diverges():
    """SANA's un-normalised keys give |1 − β‖k‖²| > 1 on large inputs and the state grows along the scan;
    the default L2-normalised keys keep every step contractive."""
    x = torch.randn(1, 1024, 32, generator=torch.Generator().manual_seed(0)) * 4
    out = {}
    for key_norm in ("official", "l2"):
        torch.manual_seed(0)
        with torch.no_grad():
            out[key_norm] = create_mixer("gated_delta", 32, 2, key_norm=key_norm, conv_kernel_size=0)(x, (32, 32))
    assert torch.isfinite(out["l2"]).all() and out["l2"].abs().max() < 100
    assert not torch.isfinite(out["official"]).all() or out["official"].abs().max() > 1e6


@pytest.mark.parametrize("case,options", [("causal", dict()), ("causal_neg_eigval", dict(allow_neg_eigval=True))])
def test_kda_causal_matches_official_layer(case, options):
    assert official("kda", case, num_heads=2, causal=True, **options) < TOL


def test_kda_bidirectional_differs_from_causal_and_sees_the_future():
    torch.manual_seed(0)
    m = create_mixer("kda", 32, 2).eval()
    x = torch.randn(1, 30, 32)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        first = m(x, (5, 6))[:, 0]
        changed = m(x2, (5, 6))[:, 0]
        m.causal = True
        causal_first = m(x2, (5, 6))[:, 0]
        m.causal = False
    assert (first - changed).abs().max() > 1e-4  # token 0 reads token 29 through the backward scan
    torch.testing.assert_close(m.eval()(x, (5, 6))[:, 0], first)
    assert (causal_first - changed).abs().max() > 1e-6


@pytest.mark.parametrize("name,hw,options", [
    ("gla", (13, 5), dict(order="cross")),
    ("lion", (7, 9), dict(mask_type="Selective")),
    ("gated_delta", (7, 9), {}),
    ("kda", (13, 5), dict(order="column")),
    ("liger", (7, 9), dict(window_mix=0.0)),
])
def test_triton_backend_matches_torch(name, hw, options):
    """The mixers pass ``backend`` to gated_scan: Triton (interpreted) == PyTorch, with a prefix token."""
    torch.manual_seed(0)
    mixers = [create_mixer(name, 16, 2, backend=b, **options).eval() for b in ("torch", "triton")]
    mixers[1].load_state_dict(mixers[0].state_dict())
    x = torch.randn(1, 1 + hw[0] * hw[1], 16)
    with torch.no_grad():
        ref, out = (m(x, hw, 1) for m in mixers)
    assert rel_err(out, ref) < 1e-5

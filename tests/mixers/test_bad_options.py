"""Every constructor option of every mixer refuses bad values with a ``ValueError`` that names it.

The option list comes from :func:`linvision.mixers.mixer_options`, so a new mixer or a new option without
a row in ``BAD`` (or ``SHARED``) fails ``test_every_option_refuses_bad_values`` until one is added.
"""
import math

import pytest

import linvision
from linvision.mixers import list_mixers, mixer_options

NAN, INF = math.nan, math.inf
DIM, HEADS = 32, 2  # dim a multiple of 4·heads (pLSTM's gate slices)


def bools():
    """Truthy and falsy non-bools: a string, ints, None."""
    return ["no", "False", 1, 0, None]


def floats(*out_of_range, optional=False):
    """Non-finite, a numeric string, a bool, (None unless optional), then the option's out-of-range values."""
    return [NAN, INF, -INF, "1e-6", True] + ([] if optional else [None]) + list(out_of_range)


def ints(*out_of_range, optional=False):
    """A float (even integral), a numeric string, a bool, NaN, (None unless optional), then out-of-range values."""
    return [2.0, 2.5, "4", True, NAN] + ([] if optional else [None]) + list(out_of_range)


def choices(optional=False):
    """A name not among the choices, a non-string, (None unless optional)."""
    return ["bogus", 1, True] + ([] if optional else [None])


# Options with one meaning wherever they appear.
SHARED = {
    "dim": ints(0, -DIM),
    "num_heads": ints(0, -1),
    "qkv_bias": bools(),
    "proj_bias": bools(),
    "backend": choices() + ["cuda"],
}

BAD = {
    "clear": {
        "radius": ints(0, -1),
        "pool_factor": ints(0, -2, optional=True),
        "rope": bools(),
        "rope_theta": floats(1.0, 0.5, -1.0),
        "rope_ntk_factor": floats(0.0, -1.0),
        "train_seq_len": ints(1, 0, optional=True),
        "pooled_log_factor": floats(0.0, -1.0),
    },
    "dydila": {
        "dynamic_projection": bools(),
        "dynamic_kernel": bools(),
        "differential": bools(),
        "num_projectors": ints(0, -1),
        "num_kernels": ints(0, -1),
        "num_lambdas": ints(0, -1),
        "gamma_init": floats(-1.0),
        "lambda_init": floats(),
        "router_grad": choices(),
        "denominator": choices(),
        "den_min": floats(-1.0),
        "relu_after_diff": bools(),
        "dwc": bools(),
        "dwc_kernel_size": ints(0, 4, -3),
        "dwc_shared_across_heads": bools(),
        "eps": floats(-1e-6),
    },
    "gated_delta": {
        "use_output_gate": bools(),
        "conv_kernel_size": ints(-1),  # 0: no convolution
        "eps": floats(-1e-15),
        "key_norm": choices(),
        "num_householder": ints(0, -1),
        "order": choices(),
        "chunk_size": ints(0, -1, optional=True),
    },
    "gla": {
        "expand_k": floats(0.0, -0.5, 0.01),  # dim·expand_k a positive multiple of num_heads
        "expand_v": floats(0.5, 2.0),  # 1 only
        "gate_low_rank_dim": ints(0, -1),
        "gate_logit_normalizer": floats(0.0, -1.0),
        "clamp_min": floats(0.5, optional=True),  # a log decay: <= 0
        "layernorm_eps": floats(0.0, -1.0),
        "use_act_in_conv": bools(),
        "use_bias_in_dwconv": bools(),
        "use_out_act": bools(),
        "order": choices(),
        "chunk_size": ints(0, -1, optional=True),
    },
    "hedgehog": {
        "feature_dim": ints(0, -1, optional=True),
        "form": choices(),
        "feature_bias": bools(),
        "eps": floats(-1e-12),
    },
    "infsa": {
        "mode": choices(),
        "rho_init": floats(0.0, 1.0, -0.5, 1.5),
        "rho_learnable": bools(),
        "per_token": bools(),
        "attn_drop": floats(-0.1, 1.0),
        "eps": floats(-1e-6),
    },
    "kda": {
        "head_dim": ints(0, -1, optional=True),
        "expand_v": floats(0.0, -1.0, 0.3),  # head_dim·expand_v a positive int
        "use_short_conv": bools(),
        "conv_size": ints(0, -1),
        "conv_bias": bools(),
        "allow_neg_eigval": bools(),
        "norm_eps": floats(0.0, -1.0),
        "causal": bools(),
        "order": choices(),
        "chunk_size": ints(0, -1, optional=True),
    },
    "lightnet": {
        "causal": bools(),
        "q_activation": choices(),
        "lse_init": [NAN, INF, "0", True, None],  # any finite value or -inf
        "use_lrpe": bools(),
        "lrpe_base": floats(0.0, -1.0),
        "lrpe_theta": choices(),
        "lrpe_learnable": bools(),
        "use_output_gate": bools(),
        "gate_rank": ints(0, -1, optional=True),
        "gate_position": choices(),
        "norm_eps": floats(-1.0),
        "use_tpe": bools(),
        "tpe_mode": choices(),
        "tpe_direction": choices(optional=True),
    },
    "liger": {
        "radius": ints(0, -1),
        "window_mix": floats(-0.1, 1.5),
        "gate_normalizer": floats(0.0, -1.0),
        "order": choices(),
    },
    "lina": {
        "normalization": choices(),
        "eps": floats(-1.0, optional=True),
        "dwc": bools(),
        "dwc_kernel_size": ints(0, 4),
        "kv_gate": bools(),
        "gate_tokens": ints(0, -1),
        "gate_prefix_tokens": ints(-1, 320),  # must be < gate_tokens (320)
        "gate_grid": [(16.0, 16.0), ("16", "16"), "16", (16,), (0, 256), (True, 256), 256],
        "gate_resize": choices(),
        "post_norm": bools(),
    },
    "linear": {
        "feature_map": choices(),
        "eps": floats(-1.0),
    },
    "linfusion": {
        "projection_mid_dim": ints(0, -2, optional=True),
        "eps": floats(-1.0),
        "qkv_bias": bools(),
        "out_bias": bools(),
        "dropout": floats(-0.1, 1.0),
    },
    "lion": {
        "mask_type": choices(),
        "qk_scale": floats(0.0, -1.0, optional=True),
        "eps": floats(-1e-6),
        "order": choices(),
        "chunk_size": ints(0, -1, optional=True),
    },
    "lit": {
        "dwc_kernel_size": ints(0, 4),
        "dwc_shared_across_heads": bools(),
        "eps": floats(-1.0),
    },
    "lolcats": {
        "window": choices(),
        "radius": ints(0, -1),
        "init_window_factor": floats(),
        "affine_factors": bools(),
        "feature_dim": ints(0, -1, optional=True),
        "form": choices(),
        "feature_bias": bools(),
    },
    "nala": {
        "norm_eps": floats(-1.0),
        "rope": bools(),
        "rope_base": floats(1.0, 0.5),
    },
    "nala_softmax": {
        "rope": bools(),
        "rope_base": floats(1.0, 0.5),
    },
    "plstm": {
        "mode": choices(),
        "prefix_mode": choices(),
        "dmode_chirality": choices(),
        "source_bias_init": floats(),
        "mark_bias_init": floats(),
        "direct_bias_init": floats(),
        "transition_bias_init": floats(),
        "transition_scale": floats(),
        "orientation_scale": floats(),
        "norm_eps": floats(-1.0),
        "method": choices(),
        "chunk_size": ints(0, 3, optional=True),  # a power of two
    },
    "sana": {
        "out_bias": bools(),
        "qk_norm": bools(),
        "norm_eps": floats(0.0, -1.0),
        "eps": floats(-1e-15),
        "dropout": floats(-0.1, 1.0),
    },
    "softmax": {},
    "transnormer": {
        "act_fun": choices(),
        "norm_type": choices(),
        "bias": bools(),
    },
    "transnormer_diag": {
        "block_size": ints(0, -1) + [(8.0, 8), ("8", "8"), "8", (8,), (8, 8, 8), (0, 8), (True, 8)],
        "use_softmax": bools(),
        "act_fun": choices(),
        "norm_type": choices(),
        "bias": bools(),
    },
}


def option_cases():
    for name in list_mixers():
        for option in mixer_options(name):
            yield pytest.param(name, option, id=f"{name}-{option}")


@pytest.mark.parametrize("name,option", list(option_cases()))
def test_every_option_refuses_bad_values(name, option):
    table = {**SHARED, **BAD.get(name, {})}
    if option not in table:
        pytest.fail(f"option {option!r} of mixer {name!r} has no bad-value row: add one to BAD[{name!r}]")
    accepted = []
    for value in table[option]:
        try:
            linvision.create_mixer(name, **{"dim": DIM, "num_heads": HEADS, option: value})
        except ValueError as e:
            assert option in str(e), f"{name}({option}={value!r}): the message does not name the option: {e}"
        else:
            accepted.append(value)
    assert not accepted, f"{name} accepted {option}={accepted!r}"


def test_every_row_is_an_option():
    """No stale or misspelled rows (they would test nothing)."""
    assert sorted(BAD) == list_mixers()
    for name, table in BAD.items():
        stale = set(table) - set(mixer_options(name))
        assert not stale, f"{name}: rows for unknown options {stale}"


def test_defaults_and_none_options_are_accepted():
    """The rows differ from a valid call only in the option under test."""
    for name in list_mixers():
        linvision.create_mixer(name, dim=DIM, num_heads=HEADS)
    linvision.create_mixer("lightnet", DIM, HEADS, lse_init=0.0, gate_rank=3, tpe_direction="causal", use_tpe=True)
    linvision.create_mixer(
        "lina", DIM, HEADS, eps=1e-5, kv_gate=True, gate_tokens=80, gate_prefix_tokens=16, gate_grid=(8, 8)
    )
    linvision.create_mixer("plstm", DIM, HEADS, chunk_size=4, transition_scale=-1.0)
    linvision.create_mixer("clear", DIM, HEADS, pool_factor=1, train_seq_len=4608)


def test_from_softmax_switches_are_checked():
    teacher = linvision.create_mixer("softmax", DIM, HEADS)
    for cls, option, bad in (
        (linvision.mixer_class("lit"), "inherit", ["qkv", None, 1]),
        (linvision.mixer_class("lina"), "copy_weights", bools()),
        (linvision.mixer_class("linfusion"), "copy_weights", bools()),
    ):
        for value in bad:
            with pytest.raises(ValueError, match=option):
                cls.from_softmax(teacher, **{option: value})

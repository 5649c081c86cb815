"""The public ops of ``linvision.kernels`` are functions, and refuse bad scalar arguments with a
``ValueError`` that names the argument (NaN, inf, out of range, wrong type, bool-as-string)."""
import math

import pytest
import torch

import linvision.kernels as K
from linvision.kernels import (
    additive_scan,
    linear_attention,
    linear_infsa,
    linear_infsa_pooled,
    plstm1d,
    plstm2d,
    plstm_dag,
    pure_infsa,
    window_attention,
)

NAN, INF = math.nan, math.inf
BOOLS = ["no", 1, None]
HW = (3, 4)


def test_ops_are_callables():
    for op in (additive_scan, linear_attention, linear_infsa, linear_infsa_pooled, plstm1d, plstm2d, plstm_dag,
               pure_infsa, window_attention):
        assert callable(op) and not isinstance(op, type(K)), op
    assert all(callable(getattr(K, name)) for name in K.__all__)


def qkv():
    torch.manual_seed(0)
    return [torch.randn(1, 12, 2, 4) for _ in range(3)]


def gates():
    return [torch.rand(1, 12, 2) for _ in range(9)]


def call_linear_attention(**kw):
    return linear_attention(*qkv(), **kw)


def call_window_attention(**kw):
    kw = {"hw": HW, "radius": 2, **kw}
    return window_attention(*qkv(), kw.pop("hw"), **kw)


def call_additive_scan(**kw):
    return additive_scan(*qkv(), **kw)


def call_plstm2d(**kw):
    return plstm2d(*qkv(), *gates(), **{"hw": HW, **kw})


def infsa_call(op):
    def call(**kw):
        return op(*qkv(), **kw)

    call.__name__ = op.__name__
    return call


CASES = [
    (call_linear_attention, "eps", [NAN, INF, -1.0, "1e-6", True], {}),
    (call_linear_attention, "scale", [NAN, INF, "1", True], {"normalize": "none"}),
    (call_linear_attention, "feature_offset", [NAN, INF, -1.0, "0", True], {"feature_map": "relu"}),
    (call_linear_attention, "feature_map", ["elu", 1], {}),
    (call_linear_attention, "normalize", ["mean", None], {}),
    (call_linear_attention, "mean", BOOLS, {}),
    (call_window_attention, "hw", [(3.0, 4.0), ("3", "4"), "34", (True, 4), (3,)], {}),
    (call_window_attention, "radius", [0, 2.0, "2", True, None], {}),
    (call_window_attention, "num_prefix_tokens", [-1, 0.0, "0", True], {}),
    (call_window_attention, "scale", [NAN, INF, "1", True], {}),
    (call_additive_scan, "causal", BOOLS, {}),
    (call_additive_scan, "lse_init", [NAN, INF, "0", True, None], {}),
    (call_additive_scan, "out_dtype", ["float32", torch.int32, 32], {}),
    (call_plstm2d, "hw", [(3.0, 4.0), (3.5, 4), ("3", "4"), (True, 12)], {}),
    (call_plstm2d, "scale", [NAN, INF, 0.0, -1.0, "1", True], {}),
    (call_plstm2d, "method", ["bogus", None], {}),
    (call_plstm2d, "chunk_size", [0, 3, 4.0, "4", True], {}),
    (call_plstm2d, "out_dtype", ["float32", torch.int64], {}),
    (infsa_call(linear_infsa), "per_token", BOOLS, {}),
] + [
    (infsa_call(op), arg, bad, {})
    for op in (pure_infsa, linear_infsa_pooled, linear_infsa)
    for arg, bad in (("eps", [NAN, INF, -1.0, "0", True]), ("rho", [NAN, INF, "0.5", True]))
]


@pytest.mark.parametrize("call,arg,bad,base", CASES, ids=[f"{c[0].__name__}-{c[1]}" for c in CASES])
def test_bad_scalar_arguments_raise(call, arg, bad, base):
    call(**base)  # valid without the bad value
    for value in bad:
        with pytest.raises(ValueError, match=arg):
            call(**base, **{arg: value})


def test_out_dtype_keeps_the_fp32_result_of_half_inputs():
    q, k, v = (t.half() for t in qkv())
    g = [t.half() for t in gates()]
    for out in (additive_scan(q, k, v, out_dtype=torch.float32), plstm2d(q, k, v, *g, hw=HW, out_dtype=torch.float32)):
        assert out.dtype == torch.float32
    ref = additive_scan(*(t.float() for t in (q, k, v)))
    torch.testing.assert_close(additive_scan(q, k, v, out_dtype=torch.float32), ref, rtol=1e-5, atol=1e-6)

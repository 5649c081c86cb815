"""Parity with the official implementations, on golden tensors produced once by the official modules.

Each ``tests/fixtures/<mechanism>/<case>.safetensors`` holds ``param.*`` (the official module's state dict,
official names), ``input.*``, ``output`` and ``arg.*`` (``hw``, ``num_prefix_tokens``); the README next to
it names the repository, commit, function, constructor arguments and seed. No network, no official code.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linvision import create_mixer
from tests.helpers import rel_err

pytestmark = pytest.mark.golden  # every test here compares with a stored fixture (.ci/run reruns them)
FIXTURES = Path(__file__).parents[1] / "fixtures"
TOL = 1e-5


def load_case(mechanism: str, case: str):
    data = load_file(str(FIXTURES / mechanism / f"{case}.safetensors"))
    params = {k[len("param."):]: v for k, v in data.items() if k.startswith("param.")}
    hw = tuple(int(s) for s in data["arg.hw"])
    prefix = int(data["arg.num_prefix_tokens"])
    return params, data["input.x"], data["output"], hw, prefix


def load_exact(mixer, params):
    """Load the official state dict; every official tensor must be used and every mixer tensor given."""
    missing, unexpected = mixer.load_state_dict(params, strict=True)
    assert not missing and not unexpected
    return mixer.eval()


# ------------------------------------------------------------------------------------------ LinFusion
# Huage001/LinFusion @62ef289, src/linfusion/attention.py::GeneralizedLinearAttention(query_dim=C,
# out_dim=C, dim_head=C // heads, projection_mid_dim=m); names are the same as ours.
LINFUSION_CASES = {
    "default": dict(dim=32, num_heads=2, projection_mid_dim=None),
    "mid_dim": dict(dim=64, num_heads=4, projection_mid_dim=4),
    # feature-MLP biases shifted so that φ ≈ e^-3: the denominator is ~0.04 and eps = 1e-4 shows
    "small_denominator": dict(dim=32, num_heads=2, projection_mid_dim=None),
}


@pytest.mark.parametrize("case", sorted(LINFUSION_CASES))
def test_linfusion_matches_official(case):
    params, x, ref, hw, prefix = load_case("linfusion", case)
    mixer = load_exact(create_mixer("linfusion", **LINFUSION_CASES[case]), params)
    with torch.no_grad():
        out = mixer(x, hw, prefix)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_linfusion_fixture_eps_matters():
    """The small-denominator fixture tells the official eps = 1e-4 (on the mean) from 1e-6 or 0."""
    params, x, ref, hw, prefix = load_case("linfusion", "small_denominator")
    for eps in (1e-6, 0.0):
        mixer = load_exact(create_mixer("linfusion", **dict(LINFUSION_CASES["small_denominator"], eps=eps)), params)
        with torch.no_grad():
            assert rel_err(mixer(x, hw, prefix), ref) > 1e-4


# ------------------------------------------------------------------------------------------ LINA
# techmonsterwang/LINA @f13f7c3. Decoder (division + DWC + KV gate; N = 320 = 64 condition + 16x16 image
# tokens, hard-coded officially), encoder (division only) and linear9 (subtraction; split q / kv weights,
# fused into qkv by the mixer's load hook).
LINA_CASES = {
    "div_dwc_kvgate": dict(dim=32, num_heads=4, normalization="div", dwc=True, kv_gate=True,
                           gate_tokens=320, gate_prefix_tokens=64),
    "div_encoder": dict(dim=32, num_heads=4, normalization="div", dwc=False),
    "sub_linear9": dict(dim=32, num_heads=4, normalization="sub", dwc=False),
}


@pytest.mark.parametrize("case", sorted(LINA_CASES))
def test_lina_matches_official(case):
    params, x, ref, hw, prefix = load_case("lina", case)
    mixer = load_exact(create_mixer("lina", **LINA_CASES[case]), params)
    with torch.no_grad():
        out = mixer(x, hw, prefix)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_lina_fixture_gate_matters():
    """The decoder fixture's random KV gate changes the output, so the parity above covers it."""
    params, x, ref, hw, prefix = load_case("lina", "div_dwc_kvgate")
    params = dict(params, key_scale=torch.ones_like(params["key_scale"]),
                  value_scale=torch.ones_like(params["value_scale"]))
    mixer = load_exact(create_mixer("lina", **LINA_CASES["div_dwc_kvgate"]), params)
    with torch.no_grad():
        assert rel_err(mixer(x, hw, prefix), ref) > 1e-2


# ------------------------------------------------------------------------------------------ NaLaFormer
# ZacharyMeng/NaLaFormer @1f1c10a, NaLaformer/NALA.py::NormAwareLinearAttn(dim, num_heads) called with
# RoPE(dim, num_heads)((h, w)); official input/output layout (B, C, H, W); names are the same as ours.
NALA_CASES = {"grid6x8": dict(dim=32, num_heads=2)}


@pytest.mark.parametrize("case", sorted(NALA_CASES))
def test_nala_matches_official(case):
    params, x, ref, hw, prefix = load_case("nala", case)
    mixer = load_exact(create_mixer("nala", **NALA_CASES[case]), params)
    B, C, H, W = x.shape
    assert (H, W) == hw and prefix == 0
    tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, C), raster order
    with torch.no_grad():
        out = mixer(tokens, hw, prefix)
    out = out.transpose(1, 2).reshape(B, C, H, W)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_err(out, ref) < TOL

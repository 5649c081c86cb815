"""The InfSA mixer: upstream parity (golden tensors), its options, and the eigenvector benchmark."""
import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import linvision
from linvision.benchmarks import infsa_eigen
from linvision.mixers.infsa import InfSAAttention, official_state_dict_to_linvision
from tests.helpers import rel_err

GOLDEN = Path(__file__).parents[1] / "fixtures" / "infsa" / "golden.safetensors"
DIM, HEADS = 24, 3


def make(**options):
    torch.manual_seed(0)
    return linvision.create_mixer("infsa", dim=DIM, num_heads=HEADS, **options)


def official_module(golden, variant):
    prefix = f"module.{variant}.state."
    return {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}


@pytest.mark.golden
@pytest.mark.parametrize("variant,mode", [("pure", "quadratic"), ("linear", "linear")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_golden_parity_with_upstream_module(variant, mode, backend):
    """Upstream InfSAAttention (rho_init=0.9, random biases): output and input gradient of sum(y²)."""
    g = load_file(GOLDEN)
    m = linvision.create_mixer("infsa", dim=12, num_heads=3, mode=mode, backend=backend)
    m.load_state_dict(official_state_dict_to_linvision(official_module(g, variant)))
    assert abs(m.rho.item() - 0.9) < 1e-6
    x = g[f"module.{variant}.x"].clone().requires_grad_(True)
    y = m(x, hw=(2, 5))
    y.square().sum().backward()
    assert rel_err(y, g[f"module.{variant}.y"]) < 1e-5
    assert rel_err(x.grad, g[f"module.{variant}.x_grad"]) < 1e-5
    assert m.rho_logit.grad is None  # upstream: ρ detached by .item()


def test_linear_mode_is_rank_one_and_default():
    m = make()
    assert m.mode == "linear" and not m.per_token and not m.rho_learnable
    x = torch.randn(2, 1 + 5 * 6, DIM)
    y = m(x, hw=(5, 6), num_prefix_tokens=1)
    assert torch.equal(y, y[:, :1].expand_as(y))
    y.sum()  # a real tensor, safe to modify in place (timm's inplace LayerScale)
    y.mul_(2)


def test_prefix_tokens_are_ordinary_tokens():
    """Upstream has no prefix tokens: hw only checks the count, the output depends on the token set alone."""
    m = make(mode="quadratic")
    x = torch.randn(1, 13, DIM)
    torch.testing.assert_close(m(x, hw=(3, 4), num_prefix_tokens=1), m(x, hw=(1, 13)))


def test_rho_constant_by_default_learnable_as_option():
    x = torch.randn(2, 12, DIM)
    fixed = make()
    assert not fixed.rho_logit.requires_grad and "rho_logit" in fixed.state_dict()
    fixed(x, hw=(3, 4)).square().sum().backward()
    assert fixed.rho_logit.grad is None
    for mode in ("linear", "quadratic"):
        learn = make(mode=mode, rho_learnable=True)
        learn(x, hw=(3, 4)).square().sum().backward()
        assert learn.rho_logit.grad is not None and learn.rho_logit.grad.abs() > 0
    torch.testing.assert_close(make(rho_learnable=True)(x, hw=(3, 4)), make()(x, hw=(3, 4)))  # same forward


def test_rho_init_sets_rho():
    assert abs(make(rho_init=0.6).rho.item() - 0.6) < 1e-6
    x = torch.randn(1, 12, DIM)
    for mode in ("linear", "quadratic"):  # the output before proj's bias is linear in ρ
        a, b = make(mode=mode, rho_init=0.6), make(mode=mode, rho_init=0.3)
        torch.testing.assert_close(a(x, hw=(3, 4)) - a.proj.bias, 2 * (b(x, hw=(3, 4)) - b.proj.bias))


def test_per_token_option_differentiates_tokens():
    x = torch.randn(2, 12, DIM)
    y = make(per_token=True)(x, hw=(3, 4))
    assert not torch.allclose(y, y[:, :1].expand_as(y))


def test_upstream_initialisation():
    m = make(qkv_bias=True)
    bound = math.sqrt(6 / (2 * DIM))  # xavier-uniform of each C×C block
    assert m.qkv.weight.abs().max() <= bound and m.proj.weight.abs().max() <= bound
    assert m.qkv.weight.abs().max() > 0.8 * bound
    assert torch.equal(m.qkv.bias, torch.zeros_like(m.qkv.bias)) and torch.equal(m.proj.bias, torch.zeros_like(m.proj.bias))


@pytest.mark.parametrize("mode", ["linear", "quadratic"])
def test_attention_dropout_only_in_training(mode):
    m = make(mode=mode, attn_drop=0.5)
    x = torch.randn(1, 20, DIM)
    ref = make(mode=mode)
    m.eval()
    torch.testing.assert_close(m(x, hw=(4, 5)), ref(x, hw=(4, 5)))
    m.train()
    assert not torch.allclose(m(x, hw=(4, 5)), ref(x, hw=(4, 5)))


@pytest.mark.parametrize("options", [dict(), dict(mode="quadratic"), dict(per_token=True)])
def test_triton_backend_matches_torch(options):
    x = torch.randn(2, 1 + 4 * 5, DIM, requires_grad=True)
    outs = []
    for backend in ("torch", "triton"):
        m = make(backend=backend, rho_learnable=True, **options)
        y = m(x, hw=(4, 5), num_prefix_tokens=1)
        gx, grho = torch.autograd.grad(y.square().sum(), (x, m.rho_logit))
        outs.append((y, gx, grho))
    for a, b in zip(*outs):
        assert rel_err(a, b) < 1e-5


def test_official_state_dict_conversion_errors():
    with pytest.raises(ValueError, match="missing"):
        official_state_dict_to_linvision({"q_proj.weight": torch.zeros(2, 2)})


def test_bad_options_raise():
    with pytest.raises(ValueError, match="mode"):
        make(mode="pure")
    with pytest.raises(ValueError, match="rho_init"):
        make(rho_init=1.0)
    with pytest.raises(ValueError, match="per_token"):
        make(mode="quadratic", per_token=True)
    with pytest.raises(ValueError, match="attn_drop"):
        make(attn_drop=1.0)
    with pytest.raises(ValueError, match="attn_drop"):
        make(per_token=True, attn_drop=0.1)
    with pytest.raises(ValueError, match="eps"):
        make(eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        make(backend="cuda")


def test_docstring_names_paper_and_official_code():
    doc = InfSAAttention.__doc__ + __import__("linvision.mixers.infsa", fromlist=["x"]).__doc__
    for needle in ("Infinite Self-Attention", "2603.00175", "giorgioroffo/infinite-self-attention", "4a37fc0"):
        assert needle in doc


def test_eigen_benchmark_runs_tiny(capsys, tmp_path):
    parser = argparse.ArgumentParser()
    infsa_eigen.add_arguments(parser)
    # digits needs scikit-learn, which linvision does not depend on: use it only where it is installed.
    sources = ["gaussian"] + (["digits"] if importlib.util.find_spec("sklearn") else [])
    out = tmp_path / "rows.json"
    args = parser.parse_args(
        ["--sources", *sources, "--images", "2", "--img-size", "32", "--patch", "8", "--dim", "32", "--heads", "2",
         "--per-head", "--json", str(out)]
    )
    assert infsa_eigen.main(args) == 0
    text = capsys.readouterr().out
    assert "cos_a_left" in text and "gaussian" in text
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * len(sources)
    for r in rows:
        assert r["tokens"] == 16
        for c in infsa_eigen.COLUMNS:
            assert -1e-9 <= r[c] <= 1 + 1e-9


def test_perron_vectors_of_a_known_matrix():
    A = torch.tensor([[2.0, 1.0], [0.5, 1.0]], dtype=torch.float64)
    left, right = infsa_eigen.perron_vectors(A)
    lam = torch.linalg.eigvals(A).real.max()
    torch.testing.assert_close(left @ A, lam * left)
    torch.testing.assert_close(A @ right, lam * right)
    assert (left >= 0).all() and (right >= 0).all()

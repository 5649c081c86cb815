"""The contract every registered mixer keeps: shapes, any resolution, prefix tokens, gradients, errors."""
import pytest
import torch

import linvision
from linvision.mixers import TokenMixer, mixer_options

MIXERS = linvision.list_mixers()
DIM, HEADS = 32, 2


def make(name, **options):
    torch.manual_seed(0)
    return linvision.create_mixer(name, dim=DIM, num_heads=HEADS, **options)


def test_registry_lists_the_baselines():
    assert {"softmax", "linear"} <= set(MIXERS)
    assert MIXERS == sorted(MIXERS)
    assert all(issubclass(linvision.mixer_class(n), TokenMixer) for n in MIXERS)


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("hw,prefix", [((7, 9), 0), ((5, 4), 1), ((1, 1), 3), ((12, 3), 0)])
def test_shapes_at_any_resolution(name, hw, prefix):
    m = make(name)
    x = torch.randn(2, hw[0] * hw[1] + prefix, DIM)
    y = m(x, hw=hw, num_prefix_tokens=prefix)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", MIXERS)
def test_resolution_is_not_state(name):
    """A call at another size in between leaves the next call's output unchanged."""
    m = make(name)
    x = torch.randn(1, 6 * 5, DIM)
    first = m(x, hw=(6, 5))
    m(torch.randn(1, 11 * 13 + 1, DIM), hw=(11, 13), num_prefix_tokens=1)
    torch.testing.assert_close(m(x, hw=(6, 5)), first)


@pytest.mark.parametrize("name", MIXERS)
def test_gradients_reach_input_and_every_parameter(name):
    m = make(name)
    x = torch.randn(2, 1 + 6 * 7, DIM, requires_grad=True)
    m(x, hw=(6, 7), num_prefix_tokens=1).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: no gradient for {pname}"
            assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("name", MIXERS)
def test_inference_matches_training_path(name):
    """Under no_grad a mixer may take another code path (e.g. streaming); results must agree."""
    m = make(name).eval()
    x = torch.randn(2, 2 + 9 * 7, DIM)
    with_grad = m(x, hw=(9, 7), num_prefix_tokens=2)
    with torch.no_grad():
        without = m(x, hw=(9, 7), num_prefix_tokens=2)
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MIXERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_finite(name, dtype):
    m = make(name).to(dtype)
    x = torch.randn(1, 1 + 16 * 16, DIM, dtype=dtype)
    y = m(x, hw=(16, 16), num_prefix_tokens=1)
    assert y.dtype == dtype and torch.isfinite(y).all()


@pytest.mark.parametrize("name", MIXERS)
def test_bad_input_raises_clear_errors(name):
    m = make(name)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, 3, 4, DIM), hw=(3, 4))  # wrong rank
    with pytest.raises(ValueError, match="token count"):
        m(torch.randn(2, 13, DIM), hw=(3, 4))  # N != h*w
    with pytest.raises(ValueError, match="token count"):
        m(torch.randn(2, 12, DIM), hw=(3, 4), num_prefix_tokens=1)  # N != h*w + prefix
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(2, 12, DIM + 1), hw=(3, 4))
    with pytest.raises(ValueError, match="hw"):
        m(torch.randn(2, 12, DIM), hw=12)
    with pytest.raises(ValueError, match="floating"):
        m(torch.ones(2, 12, DIM, dtype=torch.long), hw=(3, 4))


def test_unknown_mixer_and_option():
    with pytest.raises(ValueError, match="unknown mixer 'nope'.*softmax"):
        linvision.create_mixer("nope", dim=DIM)
    with pytest.raises(ValueError, match="unknown option.*not_an_option"):
        linvision.create_mixer("linear", dim=DIM, not_an_option=1)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        linvision.create_mixer("softmax", dim=30, num_heads=4)


@pytest.mark.parametrize("name", MIXERS)
def test_options_are_keyword_arguments(name):
    """Mechanism options are plain constructor kwargs (they become the saved config)."""
    opts = mixer_options(name)
    assert opts[:2] == ["dim", "num_heads"]


# Mixers whose CPU path holds an N x N matrix: 64K tokens is out of reach for them on a CPU.
QUADRATIC_ON_CPU = {"softmax"}


@pytest.mark.parametrize("name", [n for n in MIXERS if n not in QUADRATIC_ON_CPU])
def test_fp16_at_256x256_tokens_has_no_nan(name):
    """States and normalisers in fp32: 65,536 fp16 tokens give finite outputs."""
    m = make(name).half()
    x = torch.randn(1, 256 * 256, DIM, dtype=torch.float16) * 4
    with torch.no_grad():
        y = m(x, hw=(256, 256))
    assert y.dtype == torch.float16 and torch.isfinite(y).all()

"""Each mixer's declared capabilities are true: prefix tokens, joint text+image attention, weight inheritance.

Callers read the declarations (``TokenMixer.prefix_tokens``, ``joint_attention``, ``softmax_weights``,
``paper_inherit``, ``linear_cost``) instead of trying a mixer; these tests try every mixer once, here.
"""
import pytest
import torch

import linvision
from linvision.diffusers.joint import JOINT_MECHANISMS, JOINT_PROCESSORS, JointLayer, processor_class
from linvision.diffusers.self_attention import INHERIT_MODES, default_inherit, inherit_weights, layout_options
from linvision.mixers import mixer_class

from ..helpers import rel_err

MIXERS = linvision.list_mixers()
DIM, HEADS = 32, 2


def make(name, **options):
    torch.manual_seed(0)
    return linvision.create_mixer(name, dim=DIM, num_heads=HEADS, **options)


@pytest.mark.parametrize("name", MIXERS)
def test_declarations_have_their_types(name):
    cls = mixer_class(name)
    assert isinstance(cls.linear_cost, bool) and isinstance(cls.prefix_tokens, bool)
    assert isinstance(cls.joint_attention, bool)
    assert cls.softmax_weights in ("qkv", "to_qkv", None)
    assert cls.paper_inherit in INHERIT_MODES
    assert cls.paper_inherit == "none" or cls.softmax_weights is not None  # it copies only what it can take
    assert default_inherit(name) == cls.paper_inherit


@pytest.mark.parametrize("name", MIXERS)
def test_prefix_token_declaration(name):
    m = make(name)
    x = torch.randn(2, 3 + 4 * 5, DIM)
    if mixer_class(name).prefix_tokens:
        y = m(x, hw=(4, 5), num_prefix_tokens=3)
        assert y.shape == x.shape and torch.isfinite(y).all()
    else:
        with pytest.raises(ValueError):
            m(x, hw=(4, 5), num_prefix_tokens=3)


def _teacher():
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(1)
    return Attention(query_dim=DIM, heads=HEADS, dim_head=DIM // HEADS, bias=True, out_bias=True)


@pytest.mark.parametrize("name", MIXERS)
def test_weight_inheritance_declaration(name):
    attn = _teacher()
    m = make(name, **layout_options(name, attn))  # the teacher's bias layout, as the adapters build it
    layout = mixer_class(name).softmax_weights
    if layout is None:
        with pytest.raises(ValueError, match="cannot inherit"):
            inherit_weights(m, attn, "qkv+proj")
        return
    inherit_weights(m, attn, "qkv+proj")
    q, k, v, out = attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]
    if layout == "qkv":
        assert torch.equal(m.qkv.weight, torch.cat([q.weight, k.weight, v.weight]))
        assert torch.equal(m.proj.weight, out.weight)
    else:
        for own, theirs in ((m.to_q, q), (m.to_k, k), (m.to_v, v), (m.to_out[0], out)):
            assert torch.equal(own.weight, theirs.weight)


def test_joint_mechanisms_are_the_declaring_mixers():
    declared = {n for n in MIXERS if mixer_class(n).joint_attention}
    assert set(JOINT_MECHANISMS) == declared
    assert {p.mixer for p in JOINT_PROCESSORS} == {mixer_class(n) for n in declared}
    undeclared = next(n for n in MIXERS if n not in declared)
    with pytest.raises(ValueError, match="does not fit a joint"):
        JointLayer(undeclared, DIM, HEADS)


def _mixer_qkv(m, processor, x):
    """The mixer's own projections of ``x`` through the processor's feature inputs: ``(B, N, H, d)`` each."""
    if type(m).softmax_weights == "qkv":
        return m.project_qkv(x)
    xq, xk = processor.feature_inputs(x)
    return m.split_heads(m.to_q(xq)), m.split_heads(m.to_k(xk)), m.split_heads(m.to_v(x))


def _out(m, o):
    return m.proj(o) if type(m).softmax_weights == "qkv" else m.to_out[1](m.to_out[0](o))


@pytest.mark.parametrize("name", JOINT_MECHANISMS)
def test_joint_processor_core_is_the_mixers_own(name):
    """A joint processor with the mixer's own parameters, the text tokens as prefix tokens, gives the mixer's
    output: the processor serves the same mechanism (its functional core), not a copy."""
    options = {"radius": 3} if name == "clear" else {}
    m = make(name, **options).double()
    layer = JointLayer(name, DIM, HEADS, **options).double()
    p = layer.processor
    assert type(p) is processor_class(name)
    p.load_state_dict({k: v for k, v in m.state_dict().items() if k in p.state_dict()})
    assert set(p.state_dict()) <= set(m.state_dict())
    torch.manual_seed(2)
    hw, text = (5, 7), 4
    x = torch.randn(2, text + hw[0] * hw[1], DIM, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = _mixer_qkv(m, p, x)
        y = _out(m, p.core(q, k, v, hw, text))
        ref = m(x, hw, text)
    assert rel_err(y, ref) < 1e-12


@pytest.fixture(scope="module")
def tiny_dit():
    from linvision.diffusers.families.dit import dit_transformer

    torch.manual_seed(0)
    return dit_transformer(num_layers=1)


@pytest.mark.parametrize("name", MIXERS)
def test_every_mixer_serves_a_dit_self_attention(name, tiny_dit):
    """What lets callers pick DiT mixers by declaration alone (the demo's benchmark: every ``linear_cost``
    mixer): each installs into a diffusers DiT's self-attention, inherits per its paper and runs."""
    from linvision.diffusers import DiffusersAdapter

    adapter = DiffusersAdapter.construct_for(tiny_dit, name)
    try:
        with torch.no_grad():
            out = tiny_dit(torch.randn(2, 4, 4, 4), timestep=torch.tensor([1, 1]),
                           class_labels=torch.tensor([0, 1])).sample
    finally:
        adapter.uninstall()
    assert out.shape == (2, 8, 4, 4) and torch.isfinite(out).all()

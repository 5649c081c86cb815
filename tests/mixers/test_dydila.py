"""DyDiLA: the LiT baseline when all switches are off, each switch's effect, and the spec's equations."""
import pytest
import torch
import torch.nn.functional as F

import linvision
from linvision.kernels.linear_attn import linear_attention
from linvision.mixers.dydila import DyDiLA, power_kernel
from linvision.mixers.lit import LiTAttention
from tests.helpers import rel_err

DIM, HEADS = 32, 2
HW, PREFIX = (4, 5), 1
OFF = dict(dynamic_projection=False, dynamic_kernel=False, differential=False)


def tokens(batch=2, hw=HW, prefix=PREFIX, dtype=torch.float32):
    return torch.randn(batch, prefix + hw[0] * hw[1], DIM, dtype=dtype)


def copy_shared(dst, src):
    """Load the parameters of ``src`` that ``dst`` has with the same shape."""
    own = dst.state_dict()
    shared = {k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)
    return dst


def distinct_tables(m):
    """Spread the routed values so that routing decisions matter."""
    with torch.no_grad():
        if m.dynamic_kernel:
            m.gamma_q.copy_(torch.linspace(1.0, 4.0, m.gamma_q.numel()))
            m.gamma_k.copy_(torch.linspace(4.0, 0.5, m.gamma_k.numel()))
        if m.differential:
            m.lambda_q.copy_(torch.linspace(0.1, 0.8, m.lambda_q.numel()))
            m.lambda_k.copy_(torch.linspace(0.9, 0.2, m.lambda_k.numel()))
    return m


# --- baseline ----------------------------------------------------------------------------------------
def test_all_off_is_the_lit_baseline():
    x = tokens()
    m = DyDiLA(DIM, HEADS, dwc=False, **OFF)
    assert not any(n.startswith(("redundancy", "lambda", "gamma", "dwc")) for n, _ in m.named_parameters())
    q, k, v = m.project_qkv(x)
    core = linear_attention(q, k, v, feature_map="relu", feature_offset=1e-6, mean=True, eps=1e-6)
    torch.testing.assert_close(m(x, HW, PREFIX), m.proj(core.flatten(2)))
    # with LiT's DWC branch, the module is LiTAttention under the same state dict
    m = DyDiLA(DIM, HEADS, **OFF)
    lit = LiTAttention(DIM, HEADS)
    lit.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, HW, PREFIX), lit(x, HW, PREFIX))


def test_default_registry_entry():
    m = linvision.create_mixer("dydila", dim=64, num_heads=4)
    assert isinstance(m, DyDiLA) and m.dynamic_projection and m.dynamic_kernel and m.differential
    y = m(torch.randn(1, 2 + 7 * 9, 64), (7, 9), 2)
    assert y.shape == (1, 65, 64) and torch.isfinite(y).all()


# --- the spec's equations, restated per token in fp64 -------------------------------------------------
def reference_core(m, x):
    B, N, C = x.shape
    H, d = m.num_heads, m.head_dim
    xd = x.double()
    q, k, v = F.linear(xd, m.qkv.weight.double(), m.qkv.bias.double()).unflatten(-1, (3, H, d)).unbind(2)

    def pick(router, table):  # per-token argmax routing; router logits as the module computes them (fp32)
        idx = router(x).argmax(-1) if router is not None else torch.zeros(B, N, dtype=torch.long)
        return table.double()[idx], idx

    def phi(z, gamma):
        r = torch.relu(z) + 1e-6
        rg = r ** gamma[..., None, None]
        return rg * r.norm(dim=-1, keepdim=True) / rg.norm(dim=-1, keepdim=True)

    def redundancy(experts, router):
        W = experts.weight.double().view(m.num_projectors, C, C)  # expert p = rows p·C … (p+1)·C
        _, u = pick(router, torch.arange(m.num_projectors))
        return torch.einsum("bnc,bnoc->bno", xd, W[u]).unflatten(-1, (H, d)), u

    gq, _ = pick(m.kernel_router_q, m.gamma_q)
    gk, _ = pick(m.kernel_router_k, m.gamma_k)
    lq, lq_idx = pick(m.diff_router_q, m.lambda_q)
    lk, _ = pick(m.diff_router_k, m.lambda_k)
    q_red, u = redundancy(m.redundancy_q, m.proj_router_q)
    k_red, _ = redundancy(m.redundancy_k, m.proj_router_k)
    assert u.unique().numel() > 1 and lq_idx.unique().numel() > 1  # routing is really per token
    q_t, k_t = phi(q, gq), phi(k, gk)
    q_hat = q_t - lq[..., None, None] * phi(q_red, gq)
    k_hat = k_t - lk[..., None, None] * phi(k_red, gk)
    if m.relu_after_diff:
        q_hat, k_hat = q_hat.clamp_min(0), k_hat.clamp_min(0)
    num = torch.einsum("bnhe,bmhe,bmhv->bnhv", q_hat, k_hat, v) / N
    if m.denominator == "none":
        return num
    if m.denominator == "kernel":
        den = torch.einsum("bnhe,bmhe->bnh", q_t, k_t) / N + 1e-6
    else:
        den = (torch.einsum("bnhe,bmhe->bnh", q_hat, k_hat) / N).clamp_min(m.den_min) + 1e-6
    return num / den[..., None]


@pytest.mark.parametrize(
    "options",
    [{}, {"denominator": "differential", "den_min": 0.05}, {"denominator": "none"}, {"relu_after_diff": True}],
)
def test_matches_spec_equations(options):
    torch.manual_seed(3)
    m = distinct_tables(DyDiLA(DIM, HEADS, **options))
    x = tokens(hw=(5, 6))
    q, k, v = m.project_qkv(x)
    assert rel_err(m.attention(x, q, k, v), reference_core(m, x)) < 1e-5


# --- each part is itself ------------------------------------------------------------------------------
def test_each_switch_changes_the_output():
    x = tokens()
    full = distinct_tables(DyDiLA(DIM, HEADS))
    y = full(x, HW, PREFIX)
    # (i) one static projector (= expert 0 of the routed ones) instead of per-token experts
    static = copy_shared(DyDiLA(DIM, HEADS, dynamic_projection=False), full)
    with torch.no_grad():
        static.redundancy_q.weight.copy_(full.redundancy_q.weight[:DIM])
        static.redundancy_k.weight.copy_(full.redundancy_k.weight[:DIM])
    # (ii) plain ReLU kernel instead of the routed power kernel
    no_kernel = copy_shared(DyDiLA(DIM, HEADS, dynamic_kernel=False), full)
    # no DWC branch
    no_dwc = copy_shared(DyDiLA(DIM, HEADS, dwc=False), full)
    for variant in (static, no_kernel, no_dwc):
        assert rel_err(variant(x, HW, PREFIX), y) > 1e-3
    # (iii) the differential operator (needs the static projector to be switched off alone)
    no_diff = copy_shared(DyDiLA(DIM, HEADS, dynamic_projection=False, differential=False), full)
    assert rel_err(no_diff(x, HW, PREFIX), static(x, HW, PREFIX)) > 1e-3


@pytest.mark.parametrize("denominator", ["kernel", "differential"])
def test_zero_lambda_removes_the_differential(denominator):
    x = tokens()
    m = DyDiLA(DIM, HEADS, denominator=denominator, lambda_init=0.0)
    plain = copy_shared(DyDiLA(DIM, HEADS, dynamic_projection=False, differential=False), m)
    torch.testing.assert_close(m(x, HW, PREFIX), plain(x, HW, PREFIX), rtol=1e-5, atol=1e-6)


def test_power_kernel():
    z = torch.randn(4, 6, 16, dtype=torch.float64)
    r = torch.relu(z) + 1e-6
    torch.testing.assert_close(power_kernel(z, None, 1e-6), r)
    torch.testing.assert_close(power_kernel(z, torch.ones(4, 6, 1, dtype=torch.float64), 1e-6), r)
    gamma = torch.rand(4, 6, 1, dtype=torch.float64) * 4
    phi = power_kernel(z, gamma, 1e-6)
    torch.testing.assert_close(phi, r**gamma * r.norm(dim=-1, keepdim=True) / (r**gamma).norm(dim=-1, keepdim=True))
    torch.testing.assert_close(phi.norm(dim=-1), r.norm(dim=-1))  # norm-preserving
    # tiny inputs with a large exponent: r^γ underflows fp32, the max-normalised form does not
    small = power_kernel(1e-4 * torch.rand(3, 16), torch.full((3, 1), 30.0), 1e-6)
    assert torch.isfinite(small).all() and (small.norm(dim=-1) > 0).all()
    assert torch.equal(power_kernel(-torch.rand(2, 8), torch.full((2, 1), 3.0), 0.0), torch.zeros(2, 8))


def test_straight_through_router_gradients():
    x = tokens()
    ste = distinct_tables(DyDiLA(DIM, HEADS))
    frozen = DyDiLA(DIM, HEADS, router_grad="none")
    frozen.load_state_dict(ste.state_dict())
    y = ste(x, HW, PREFIX)
    torch.testing.assert_close(frozen(x, HW, PREFIX), y)  # the estimator does not change the forward
    y.square().mean().backward()
    routers = [n for n, _ in ste.named_parameters() if "router" in n]
    assert len(routers) == 6
    assert all(ste.get_parameter(n).grad.abs().sum() > 0 for n in routers)
    assert not any(frozen.get_parameter(n).requires_grad for n in routers)


def test_parameter_count_of_the_routed_projections():
    n_p, n_k, n_d = 3, 2, 5
    m = DyDiLA(DIM, HEADS, num_projectors=n_p, num_kernels=n_k, num_lambdas=n_d)
    base = sum(p.numel() for p in DyDiLA(DIM, HEADS, **OFF).parameters())  # LiT: qkv, proj, dwc
    extra = 2 * n_p * DIM * DIM + 2 * DIM * n_p + 2 * (n_k + DIM * n_k) + 2 * (n_d + DIM * n_d)
    assert sum(p.numel() for p in m.parameters()) == base + extra


# --- numerics ------------------------------------------------------------------------------------------
def test_exact_zeros_and_large_inputs_give_finite_gradients():
    m = distinct_tables(DyDiLA(DIM, HEADS, denominator="differential"))
    with torch.no_grad():
        m.qkv.weight[0:DIM:2] = 0  # exact zeros in q
        m.qkv.bias[0:DIM:2] = 0
    for scale in (1.0, 30.0):
        x = (scale * tokens()).requires_grad_(True)
        y = m(x, HW, PREFIX)
        y.square().mean().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_backward(dtype):
    m = DyDiLA(DIM, HEADS, denominator="differential").to(dtype)
    x = tokens(hw=(7, 9), dtype=dtype).requires_grad_(True)
    y = m(x, (7, 9), PREFIX)
    y.float().square().mean().backward()
    assert y.dtype == dtype and torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"differential": False}, "needs differential"),
        ({"num_kernels": 0}, "num_kernels"),
        ({"num_projectors": 2.0}, "num_projectors"),
        ({"denominator": "sum"}, "denominator"),
        ({"router_grad": "gumbel"}, "router_grad"),
        ({"den_min": -1.0}, "den_min"),
        ({"dynamic_kernel": 1}, "dynamic_kernel"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        linvision.create_mixer("dydila", dim=DIM, num_heads=HEADS, **options)

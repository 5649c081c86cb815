"""gated_scan's Triton kernels (interpreted on CPU) against the chunked reference and the step oracle: forward
and gradients (q, k, v, g, g_backward, β) at N = 63 and the 13 × 5 grid, fp32 and fp16, every direction."""
import pytest
import torch

from linvision.kernels import gated_scan
from linvision.kernels.gated_recurrence import triton as gst
from tests.helpers import rel_err
from tests.kernels.test_gated_scan import problem

# (direction, gate: None | "head" | "channel", delta, allow_neg_eigval, separate g_backward)
CASES = {
    "fwd-plain": ("forward", None, False, False, False),
    "bwd-head-gla": ("backward", "head", False, False, False),
    "bi-channel-gla-gb": ("bidirectional", "channel", False, False, True),
    "fwd-channel-delta-kda": ("forward", "channel", True, False, False),
    "bwd-head-delta-neg": ("backward", "head", True, True, False),
    "bi-head-delta-sana": ("bidirectional", "head", True, False, False),
    "bi-nogate-delta-neg": ("bidirectional", None, True, True, False),
}


@pytest.fixture(autouse=True)
def short_checkpoints(monkeypatch):
    """16-step checkpoint intervals, so N = 63 runs four intervals, the last one partial."""
    monkeypatch.setattr(gst, "CHECKPOINT_TOKENS", 16)


def inputs(case, N, dtype, B=1, H=1, Dk=5, Dv=7, seed=0):
    direction, gate, delta, neg, separate = CASES[case]
    q, k, v, g, beta = problem(N, gate == "channel", delta, B=B, H=H, Dk=Dk, Dv=Dv, dtype=torch.float32, seed=seed)
    g = None if gate is None else g
    gb = torch.nn.functional.logsigmoid(torch.randn_like(g) + 1) if separate else None
    tensors = {"q": q, "k": k, "v": v, "g": g, "g_backward": gb, "beta": beta}
    options = dict(direction=direction, delta=delta, allow_neg_eigval=neg, qk_l2norm=delta)
    return {n: t.to(dtype) for n, t in tensors.items() if t is not None}, options


def run(tensors, options, weight, **how):
    """Output and the gradients of ``Σ weight ⊙ out`` (name → tensor)."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in tensors.items()}
    out = gated_scan(leaves["q"], leaves["k"], leaves["v"], leaves.get("g"), leaves.get("beta"),
                     g_backward=leaves.get("g_backward"), **options, **how)
    (out.double() * weight).sum().backward()
    return out, {n: t.grad for n, t in leaves.items()}


def errors(case, N=63, dtype=torch.float32, **sizes):
    """Rel. errors of Triton against the chunked reference (same dtype) and the fp64 oracle (same values)."""
    tensors, options = inputs(case, N, dtype, **sizes)
    B, N, H = tensors["q"].shape[:3]
    weight = torch.randn(B, N, H, tensors["v"].shape[-1], dtype=torch.float64)
    out, grads = run(tensors, options, weight, backend="triton")
    assert out.dtype == dtype and all(grads[n].dtype == dtype for n in grads)
    chunked = run(tensors, options, weight, backend="torch")
    oracle = run({n: t.double() for n, t in tensors.items()}, options, weight, backend="torch", method="naive")
    result = {}
    for name, (ref_out, ref_grads) in (("chunked", chunked), ("oracle", oracle)):
        result[name] = {"out": rel_err(out, ref_out), **{n: rel_err(grads[n], ref_grads[n]) for n in grads}}
    return result


def check(result, tol):
    for name, errs in result.items():
        assert max(errs.values()) < tol, f"Triton vs {name}: {errs}"


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_chunked_and_oracle(case):
    check(errors(case), 1e-5)


@pytest.mark.parametrize("case,B,H", [("bi-head-delta-sana", 2, 1), ("bi-channel-gla-gb", 1, 2)])
def test_fp16_on_the_13x5_grid(case, B, H):
    """fp16 inputs, 65 tokens, two batches or two heads; against the fp64 oracle on the same fp16 values
    (and the chunked fp16 path, which rounds its own way)."""
    result = errors(case, N=13 * 5, dtype=torch.float16, B=B, H=H)
    check({"oracle": result["oracle"]}, 5e-3)
    check({"chunked": result["chunked"]}, 1e-2)


def test_value_tiles_and_padding(monkeypatch):
    """Several Dv tiles (the per-tile partials of dq, dk, dg, dβ are summed), a different tiling in the forward
    and the backward (the checkpoints are whole [Dk, Dv]), padded Dk and Dv."""
    monkeypatch.setattr(gst, "STATE_TILE_ELEMENTS", {"fwd": 32, "bwd": 16})
    assert gst.tiles(5, 7, "fwd") == (8, 4, 2, 4) and gst.tiles(5, 7, "bwd") == (8, 2, 4, 4)
    check(errors("bi-channel-gla-gb", N=21), 1e-5)
    check(errors("fwd-channel-delta-kda", N=21), 1e-5)


def test_strided_inputs_and_routing(monkeypatch):
    """q, k, v as views of one packed projection (read through their strides); backend='auto' stays on the
    PyTorch path for CPU tensors, and so does an empty batch; the oracle and fp64 are refused with
    backend='triton'."""
    qkv = torch.randn(1, 20, 3, 2, 6)
    q, k, v = qkv.unbind(2)
    g = torch.nn.functional.logsigmoid(torch.randn(1, 20, 2))
    out = gated_scan(q, k, v, g, direction="bidirectional", backend="triton")
    assert rel_err(out, gated_scan(q, k, v, g, direction="bidirectional", backend="torch")) < 1e-5

    def no_kernel(*args):
        raise AssertionError("the Triton kernel ran")

    monkeypatch.setattr(gst, "gated_scan_triton", no_kernel)
    torch.testing.assert_close(gated_scan(q, k, v, g, direction="bidirectional"), out, rtol=1e-5, atol=1e-6)
    empty = q[:0].detach().requires_grad_()
    gated_scan(empty, k[:0], v[:0], g[:0], direction="bidirectional", backend="triton").sum().backward()
    assert empty.grad.shape == empty.shape
    with pytest.raises(ValueError, match="oracle"):
        gated_scan(q, k, v, g, method="naive", backend="triton")
    with pytest.raises(ValueError, match="fp64"):
        gated_scan(q.double(), k.double(), v.double(), backend="triton")


def test_triton_refuses_state_and_householder_options():
    """The fused kernels carry no state in or out and run one step per token: asked for explicitly, a clear error."""
    q = torch.randn(1, 5, 1, 4)
    beta = torch.rand(1, 10, 1)
    k2, v2 = torch.randn(1, 10, 1, 4), torch.randn(1, 10, 1, 4)
    with pytest.raises(ValueError, match="num_householder"):
        gated_scan(q, k2, v2, beta=beta, delta=True, num_householder=2, backend="triton")
    with pytest.raises(ValueError, match="initial_state"):
        gated_scan(q, q, q, initial_state=torch.zeros(1, 1, 4, 4), backend="triton")
    with pytest.raises(ValueError, match="output_final_state"):
        gated_scan(q, q, q, output_final_state=True, backend="triton")

"""Gated and delta-rule linear recurrences along a token order, one or both directions: ``gated_scan``.

Covers GLA / Mamba-2-like decays (scalar per head or per key channel, in log space), the delta rule
(DeltaNet), the gated delta rule (Gated DeltaNet, KDA's per-channel form) and their bidirectional sums (ViG,
LION, SANA's BidirectionalGDN). Conventions follow fla (``fla-org/flash-linear-attention``,
``fla/ops/{gla,delta_rule,gated_delta_rule,kda}/naive.py``): the gate of token ``t`` decays the state before
``t`` writes, and outputs read the state after (see :mod:`.naive` for the step).

Implementations: ``method="naive"`` (:mod:`.naive`, token by token: the oracle) and ``method="chunked"``
(:mod:`.chunked`, the default: intra-chunk quadratic, inter-chunk fp32 state, WY/UT form for the delta rule).
DeltaProduct's ``num_householder`` steps per token run as one scan over the interleaved sub-steps
(:mod:`.householder`). Gradients of both come from autograd. ``backend="triton"`` (:mod:`.triton`, fused
recurrent kernels, forward and backward, fp32 state, states recomputed from checkpoints in the backward) runs
every direction in one call; ``backend="auto"`` picks it for CUDA tensors when Triton is importable, else the
PyTorch ``method``. DeltaProduct, ``initial_state`` and ``output_final_state`` run on the PyTorch path only.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..validation import check_bool, check_choice, check_float, check_int, check_qkv, check_triton_dtype
from .chunked import gated_scan_chunked, l2norm
from .householder import flip_tokens, interleave, reads
from .naive import gated_scan_naive

DIRECTIONS = ("forward", "backward", "bidirectional")
METHODS = ("chunked", "naive")
DEFAULT_CHUNK = {"scalar": 32, "channel": 16}  # per-channel decays build a [C, C, Dk] pairwise tensor


def gated_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Optional[Tensor] = None,
    beta: Optional[Tensor] = None,
    *,
    direction: str = "forward",
    delta: bool = False,
    allow_neg_eigval: bool = False,
    qk_l2norm: bool = False,
    g_backward: Optional[Tensor] = None,
    scale: Optional[float] = None,
    method: str = "chunked",
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    num_householder: int = 1,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    add_to: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Decayed / delta-rule state passing over ``N`` tokens; ``[B, N, H, Dv]`` in the dtype of ``q``.

    Shapes: ``q, k [B, N, H, Dk]``, ``v [B, N, H, Dv]``; ``g`` log decay ``[B, N, H]`` (one scalar per head and
    token) or ``[B, N, H, Dk]`` (per key channel), ``None`` for no decay; ``beta [B, N, H]``, the delta-rule
    write strength, required with ``delta=True`` and refused without it.

    Forward step (``α = exp g``): ``S ← diag(α_t) S``, ``u_t = β_t (v_t − Sᵀk_t)`` (delta) or ``v_t``,
    ``S ← S + k_t u_tᵀ``, ``o_t = scale·Sᵀq_t``. So with ``delta=True``: ``S ← (I − β k kᵀ) diag(α) S + β k vᵀ``
    (the rule ``S ← S(I − β k kᵀ) + β v kᵀ`` of the Dv × Dk layout). ``allow_neg_eigval`` doubles β, so a β in
    (0, 1) becomes (0, 2) and ``I − β k kᵀ`` may have a negative eigenvalue (Grazzi et al., 2025).
    ``qk_l2norm`` L2-normalises q and k over Dk first (eps 1e-6 inside the root, as fla's ``l2norm``); the delta
    rule is contractive only for unit keys, so DeltaNet-style callers set it.

    ``direction``: ``"forward"``; ``"backward"`` (the same scan on the reversed order: the gate of token t
    decays the state coming from t + 1); ``"bidirectional"``: forward (inclusive) plus backward read *before*
    token t writes, ``o_t = o^f_t + scale·(diag(α^b_t) S^b_{t+1})ᵀ q_t``. Without the delta rule that is the
    sum of the two causal scans minus the diagonal ``scale (q_t·k_t) v_t``, counted once as in LION's
    ``M = L_f + L_b − I``. The backward half uses ``g_backward`` when given (ViG's and LION's separate
    gates), else ``g``.

    ``scale`` defaults to ``Dk^-1/2``. States are fp32 (fp64 for fp64 inputs). ``chunk_size`` (chunked
    method): default 32 for scalar decay, 16 per channel.

    ``num_householder = n_h`` (DeltaProduct, Siems et al. 2025; fla's ``chunk_gated_delta_product``): ``n_h``
    delta-rule steps per token, ``k [B, N·n_h, H, Dk]``, ``v [B, N·n_h, H, Dv]``, ``beta [B, N·n_h, H]`` (token
    ``t`` owns rows ``t·n_h … t·n_h + n_h − 1``, fla's ``(t n)`` layout), ``q`` and ``g`` one per token: per
    token ``S ← diag(α_t) S``, then ``n_h`` steps ``S ← S + β_tj k_tj (v_tj − Sᵀk_tj)ᵀ``, then ``o_t`` reads.
    Needs ``delta=True``; ``1`` is the plain (gated) delta rule. Deviation (the paper is causal): ``"backward"``
    visits the tokens in reverse and each token's Householder steps in their order ``1 … n_h``; the
    bidirectional backward half reads after the decay of token ``t`` and before its first step.

    ``initial_state [B, H, Dk, Dv]`` (floating; held in fp32, fp64 for fp64 inputs): the state before the first
    token of the scan (token 0 forward, token ``N − 1`` backward); ``output_final_state=True`` returns
    ``(out, final_state)``, the state after the scan's last token, fp32 (fp64), as fla's ops. Both are refused
    with ``"bidirectional"`` (two scans, no single state).

    ``add_to [B, N, H, Dv]`` (floating, any dtype): the result is added to it and returned in its dtype; without
    autograd recording in place, so that a second scan (another direction, another order) needs no output of its
    own (the chunked method writes its pieces straight into it).

    ``backend``: ``"auto"`` (Triton for CUDA tensors when importable, else PyTorch), ``"torch"``, ``"triton"``
    (CPU tensors need ``TRITON_INTERPRET=1``; fp16, bf16, fp32; ``Dk, Dv ≤ 256``). ``method`` and
    ``chunk_size`` choose the PyTorch implementation; ``method="naive"`` always runs the oracle, and with
    ``backend="triton"`` it is an error, as are ``num_householder > 1``, ``initial_state`` and
    ``output_final_state`` (the kernels carry no state in or out; ``"auto"`` takes the PyTorch path for them).
    """
    check_qkv(q, k, v, cross=True)
    direction = check_choice("direction", direction, DIRECTIONS)
    delta = check_bool("delta", delta)
    allow_neg_eigval = check_bool("allow_neg_eigval", allow_neg_eigval)
    qk_l2norm = check_bool("qk_l2norm", qk_l2norm)
    method = check_choice("method", method, METHODS)
    B, N, H, K = q.shape
    num_householder = check_int("num_householder", num_householder, min=1)
    if k.shape[1] != N * num_householder:
        raise ValueError(f"k and v must have N·num_householder = {N * num_householder} rows, got {k.shape[1]}")
    if num_householder > 1 and not delta:
        raise ValueError("num_householder > 1 is DeltaProduct's product of delta-rule steps: pass delta=True")
    output_final_state = check_bool("output_final_state", output_final_state)
    if direction == "bidirectional" and (initial_state is not None or output_final_state):
        raise ValueError("initial_state / output_final_state need direction='forward' or 'backward' "
                         "(a bidirectional call is two scans with no single state)")
    if N == 0 or K == 0 or v.shape[-1] == 0:
        raise ValueError("empty token or head dimension")
    V = v.shape[-1]
    if initial_state is not None and (not isinstance(initial_state, Tensor) or not initial_state.is_floating_point()
                                      or tuple(initial_state.shape) != (B, H, K, V)):
        raise ValueError(f"initial_state must be a floating tensor [B, H, Dk, Dv] = {[B, H, K, V]}, "
                         f"got {tuple(getattr(initial_state, 'shape', ()))}")
    if add_to is not None and (not isinstance(add_to, Tensor) or not add_to.is_floating_point()
                               or tuple(add_to.shape) != (B, N, H, V)):
        raise ValueError(f"add_to must be a floating tensor [B, N, H, Dv] = {[B, N, H, V]}, "
                         f"got {tuple(getattr(add_to, 'shape', ()))}")
    scale = K ** -0.5 if scale is None else check_float("scale", scale, min=0, min_open=True)
    g = _check_gate("g", g, q)
    if g_backward is not None and direction != "bidirectional":
        raise ValueError("g_backward is used only with direction='bidirectional'")
    g_backward = _check_gate("g_backward", g_backward, q)
    if g is not None and g_backward is not None and g.shape[-1] != g_backward.shape[-1]:
        raise ValueError("g and g_backward must both be per-head or both per-channel")
    if delta:
        if beta is None:
            raise ValueError("delta=True needs beta [B, N, H]")
        NB = N * num_householder
        if not isinstance(beta, Tensor) or not beta.is_floating_point() or tuple(beta.shape) != (B, NB, H):
            raise ValueError(f"beta must be a floating tensor [B, N·num_householder, H] = {[B, NB, H]}, got {tuple(getattr(beta, 'shape', ()))}")
        if allow_neg_eigval:
            beta = 2.0 * beta
    else:
        if beta is not None:
            raise ValueError("beta is the delta-rule write strength: pass delta=True to use it")
        if allow_neg_eigval:
            raise ValueError("allow_neg_eigval applies to the delta rule only (delta=True)")
    if chunk_size is None:
        per_channel = any(t is not None and t.shape[-1] != 1 for t in (g, g_backward))
        chunk_size = DEFAULT_CHUNK["channel" if per_channel else "scalar"]
    chunk_size = check_int("chunk_size", chunk_size, min=1)
    chosen = resolve_backend(backend, q, k, v)
    if chosen == "triton" and method == "naive":
        if backend == "triton":
            raise ValueError("method='naive' is the PyTorch oracle; use backend='torch' (or 'auto') with it")
        chosen = "torch"
    if chosen == "triton" and (num_householder > 1 or initial_state is not None or output_final_state):
        if backend == "triton":
            raise ValueError("the Triton gated_scan has no num_householder > 1, initial_state or output_final_state; "
                             "use backend='torch' (or 'auto') with them")
        chosen = "torch"
    if chosen == "triton" and q.numel() == 0:  # B = 0 or H = 0: no program to launch
        chosen = "torch"
    out_dtype = q.dtype
    if chosen == "triton":
        check_triton_dtype(q)
        from .triton import gated_scan_triton

        if qk_l2norm:
            q, k = l2norm(q), l2norm(k)
        return _added(gated_scan_triton(q, k, v, g, beta, g_backward, scale, direction).to(out_dtype), add_to)

    nh = num_householder
    state = dict(initial_state=initial_state, output_final_state=True) if direction != "bidirectional" else {}
    gb = g if g_backward is None or direction != "bidirectional" else g_backward

    def scan(qq, kk, vv, gg, bb, exclusive=False, reverse=False, add_to=None):
        """One direction, added to ``add_to`` when given. The chunked method walks a reverse scan backwards
        itself; the oracle and DeltaProduct's interleaved sub-steps scan reversed copies (each token's
        sub-steps kept in order)."""
        copies = reverse and (nh > 1 or method == "naive")
        if copies:
            qq, gg = flip_tokens(qq, 1), flip_tokens(gg, 1)
            kk, vv, bb = (flip_tokens(t, nh) for t in (kk, vv, bb))
        qq, gg = interleave(qq, gg, nh, exclusive)
        if method == "naive":
            if qk_l2norm:
                qq, kk = l2norm(qq), l2norm(kk)
            gg = None if gg is None else gg.expand(*qq.shape)
            res = gated_scan_naive(qq, kk, vv, gg, bb, scale, exclusive, **state)
        else:
            res = gated_scan_chunked(qq, kk, vv, gg, bb, scale, exclusive, chunk_size, **state, qk_l2norm=qk_l2norm,
                                     reverse=reverse and not copies, add_to=None if nh > 1 else add_to)
        o, final = res if state else (res, None)
        o = reads(o, nh, exclusive)
        o = o.flip(1) if copies else o
        return (o if method != "naive" and nh == 1 else _added(o, add_to)), final

    if direction == "bidirectional":  # the backward half reads before token t writes, added to the forward half
        out, final = scan(q, k, v, g, beta)[0], None
        out = scan(q, k, v, gb, beta, exclusive=True, reverse=True, add_to=out)[0]
        out = _added(out.to(out_dtype), add_to)
    else:
        out, final = scan(q, k, v, g, beta, reverse=direction == "backward", add_to=add_to)
        out = out if add_to is not None else out.to(out_dtype)
    return (out, final) if output_final_state else out


def _added(o: Tensor, add_to: Optional[Tensor]) -> Tensor:
    """``o`` added to ``add_to`` (in place unless autograd records either), or ``o`` when there is none."""
    if add_to is None:
        return o
    if torch.is_grad_enabled() and (o.requires_grad or add_to.requires_grad):
        return add_to + o.to(add_to.dtype)
    return add_to.add_(o)


def _check_gate(name: str, g: Optional[Tensor], q: Tensor) -> Optional[Tensor]:
    """``None``, or ``g`` as ``[B, N, H, 1]`` (per head) or ``[B, N, H, Dk]`` (per channel)."""
    if g is None:
        return None
    B, N, H, K = q.shape
    if not isinstance(g, Tensor) or not g.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor [B, N, H] or [B, N, H, Dk]")
    if tuple(g.shape) == (B, N, H):
        return g[..., None]
    if tuple(g.shape) == (B, N, H, K):
        return g
    raise ValueError(f"{name} must be [B, N, H] = {[B, N, H]} or [B, N, H, Dk] = {[B, N, H, K]}, got {tuple(g.shape)}")


__all__ = ["DIRECTIONS", "METHODS", "gated_scan"]

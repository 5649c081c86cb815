"""PyTorch reference of LightNet's additive recurrence: the CPU path and the test oracle.

Everything is computed in fp32 (fp64 for fp64 inputs) and returned in the input dtype; autograd
flows through it, so it doubles as the ``gradcheck``-able definition. See
:func:`linvision.kernels.additive_recurrence.additive_scan` for the equations.

- Non-causal: tokens are streamed in chunks; each chunk contributes a max-referenced partial
  (``m``, ``l = Σ e^{f−m}``, ``S = Σ e^{f−m} κ vᵀ``), the partials combine like a log-sum-exp, and the
  query pass reads the normalised state. No temporary larger than one chunk of Q/K/V is held.
- Causal: ``z_t`` (a log-cum-sum-exp) is exact and per token; the output is built chunk by chunk
  from the normalised state at the chunk start plus an intra-chunk term evaluated pair by pair
  (``exp(f_s − z_t) ≤ 1`` for ``s ≤ t``), so any key magnitude stays finite.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from ..backend import accumulation_dtype
from ..chunks import Rows, stack_chunks, token_source

CHUNK_ELEMENTS = 1 << 18  # elements of one [B, chunk, H, D] temporary (non-causal streaming)
PAIR_ELEMENTS = 1 << 21  # elements of one [B, T, T, H, D] pair tensor (causal intra-chunk term)


def _safe(x: Tensor) -> Tensor:
    """Replace −inf (an empty log-sum-exp) by 0 so that differences against it are −inf, not NaN."""
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def _rows(t: Optional[Tensor], a: int, b: int) -> Optional[Tensor]:
    return None if t is None else t[:, a:b]


def chunk_tokens(t: Tensor) -> int:
    """Tokens per chunk for a [B, N, H, D] tensor: about CHUNK_ELEMENTS elements, at least 64 tokens."""
    B, _, H, D = t.shape
    return max(64, CHUNK_ELEMENTS // max(1, B * H * D))


def noncausal_state(
    k: Tensor, v: Tensor, k_mod: Optional[Tensor] = None, lse_init: float = -math.inf
) -> Tuple[Tensor, Tensor]:
    """The global state ``S = Σ_j softmax_j(f)_j ⊙ κ_j v_jᵀ`` ``[B, H, Dk, Dv]`` and ``z = lse_j f_j`` ``[B, H, Dk]``.

    ``k`` holds the log-weights ``f``; ``k_mod`` (``κ``) broadcasts to ``k``. fp32 (fp64 for fp64 inputs).
    """
    return noncausal_state_of(lambda a, b: (k[:, a:b], _rows(k_mod, a, b)), v, lse_init)


def noncausal_state_of(
    keys: Callable[[int, int], Tuple[Tensor, Optional[Tensor]]], v: Union[Tensor, Rows], lse_init: float = -math.inf,
    num_keys: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`noncausal_state` with the keys given chunk by chunk: ``keys(a, b)`` returns tokens ``a:b`` of
    ``(f, κ or None)``, so the caller can build them per chunk (never a full-size temporary); ``v`` a tensor or a
    function of a token range with ``num_keys`` (:func:`~linvision.kernels.chunks.token_source`)."""
    values, M, sample = token_source(v, num_keys)
    step = chunk_tokens(sample)
    m_all, l_all, s_all = None, None, None
    for a in range(0, M, step):
        f, k_mod = keys(a, a + step)
        acc = accumulation_dtype(f.dtype)
        f = f.to(acc)  # [B, n, H, Dk]
        m = f.amax(1)  # [B, H, Dk]
        p = torch.exp(f - _safe(m).unsqueeze(1))
        kk = p if k_mod is None else p * k_mod.to(acc)
        s = torch.einsum("bnhk,bnhv->bhkv", kk, values(a, a + f.shape[1]).to(acc))
        l = p.sum(1)
        if m_all is None:
            m_all, l_all, s_all = m, l, s
        else:
            m_new = torch.maximum(m_all, m)
            ms = _safe(m_new)
            w_old, w_new = torch.exp(m_all - ms), torch.exp(m - ms)
            l_all = l_all * w_old + l * w_new
            s_all = s_all * w_old.unsqueeze(-1) + s * w_new.unsqueeze(-1)
            m_all = m_new
    if lse_init != -math.inf:
        m_new = torch.clamp(m_all, min=lse_init)
        w_old = torch.exp(m_all - m_new)
        l_all = l_all * w_old + torch.exp(lse_init - m_new)
        s_all = s_all * w_old.unsqueeze(-1)
        m_all = m_new
    state = s_all / l_all.unsqueeze(-1)
    z = _safe(m_all) + torch.log(l_all)
    return state, z


def additive_scan_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_mod: Optional[Tensor] = None,
    causal: bool = False,
    lse_init: float = -math.inf,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Reference forward; arguments already validated (``k_mod`` broadcast to ``k``'s shape or None).

    q, k: [B, N, H, Dk], v: [B, N, H, Dv] → o: [B, N, H, Dv] in ``out_dtype`` (default q's dtype).
    """
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if causal:
        return _causal(q, k, v, k_mod, lse_init, out_dtype)
    return noncausal_scan_of(
        lambda a, b: q[:, a:b], lambda a, b: (k[:, a:b], _rows(k_mod, a, b)), v, q.shape[1], lse_init, out_dtype
    )


def noncausal_scan_of(
    queries: Callable[[int, int], Tensor],
    keys: Callable[[int, int], Tuple[Tensor, Optional[Tensor]]],
    v: Union[Tensor, Rows],
    num_queries: int,
    lse_init: float = -math.inf,
    out_dtype: Optional[torch.dtype] = None,
    output: Optional[Callable[[int, int, Tensor], Tensor]] = None,
    num_keys: Optional[int] = None,
) -> Tensor:
    """The non-causal reference with queries and keys given chunk by chunk (``queries(a, b)``: tokens ``a:b``
    of ``q``; ``keys(a, b)``: of ``(f, κ or None)``), so that no full-size temporary of them exists.

    ``v [B, M, H, Dv]`` (or a function of a token range with ``num_keys = M``) → ``[B, N, H, Dv]``
    (``N = num_queries``) in ``out_dtype`` (default the queries' dtype); with ``output(a, b, o)``, the stacked
    epilogue results of each chunk instead.
    """
    state, _ = noncausal_state_of(keys, v, lse_init, num_keys)

    def chunk(a: int, b: int) -> Tensor:
        q = queries(a, b)
        o = torch.einsum("bnhk,bhkv->bnhv", q.to(state.dtype), state).to(out_dtype or q.dtype)
        return o if output is None else output(a, b, o)

    return stack_chunks(chunk, num_queries, chunk_tokens(state[:, None, :, 0]))  # [B, 1, H, Dv]: as for v


def causal_lse(k: Tensor, lse_init: float = -math.inf) -> Tensor:
    """``z_t = log(e^{lse_init} + Σ_{s≤t} e^{f_s})`` per channel, ``[B, N, H, Dk]`` in fp32 (fp64)."""
    f = k.to(accumulation_dtype(k.dtype))
    z = torch.logcumsumexp(f, dim=1)
    if lse_init != -math.inf:
        z = torch.logaddexp(z, torch.full_like(z, lse_init))
    return z


def _causal(
    q: Tensor, k: Tensor, v: Tensor, k_mod: Optional[Tensor], lse_init: float, out_dtype: torch.dtype
) -> Tensor:
    """``o_t = q_tᵀ Σ_{s≤t} exp(f_s − z_t) ⊙ κ_s v_sᵀ``, chunked; every exponent is ≤ 0. Returns ``out_dtype``."""
    acc = accumulation_dtype(q.dtype)
    B, N, H, Dk = q.shape
    Dv = v.shape[-1]
    z = causal_lse(k, lse_init)  # [B, N, H, Dk]
    T = max(1, min(64, int(math.sqrt(PAIR_ELEMENTS / max(1, B * H * Dk)))))
    state = q.new_zeros(B, H, Dk, Dv, dtype=acc)  # normalised by z at the previous chunk end
    z_prev = torch.full((B, H, Dk), lse_init, dtype=acc, device=q.device)
    outs = []
    for a in range(0, N, T):
        b_ = min(N, a + T)
        qc, fc, vc = q[:, a:b_].to(acc), k[:, a:b_].to(acc), v[:, a:b_].to(acc)
        zc = z[:, a:b_]  # [B, t, H, Dk]
        zs = _safe(zc)
        mod = None if k_mod is None else k_mod[:, a:b_].to(acc)
        # inter-chunk: the state at the chunk start, renormalised to each z_t
        decay = torch.exp(z_prev.unsqueeze(1) - zs)  # [B, t, H, Dk]
        o = torch.einsum("bthk,bhkv->bthv", qc * decay, state)
        # intra-chunk: W[t, s] = exp(f_s − z_t) for s ≤ t
        n = b_ - a
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        expo = fc.unsqueeze(1) - zs.unsqueeze(2)  # [B, t, s, H, Dk]
        expo = expo.masked_fill(~mask[None, :, :, None, None], -math.inf)
        w = torch.exp(expo)
        if mod is not None:
            w = w * mod.unsqueeze(1)
        scores = torch.einsum("bthk,btshk->bhts", qc, w)
        o = o + torch.einsum("bhts,bshv->bthv", scores, vc)
        outs.append(o.to(out_dtype))
        # state update to the chunk end
        z_last = z[:, b_ - 1]  # [B, H, Dk]
        zl = _safe(z_last)
        kk = torch.exp(fc - zl.unsqueeze(1))
        if mod is not None:
            kk = kk * mod
        state = state * torch.exp(z_prev - zl).unsqueeze(-1) + torch.einsum("bshk,bshv->bhkv", kk, vc)
        z_prev = z_last
    return outs[0] if len(outs) == 1 else torch.cat(outs, 1)


def additive_scan_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_mod: Optional[Tensor] = None,
    lse_init: float = -math.inf,
) -> Tensor:
    """The causal form as LightNet writes it, token by token in the multiplicative form (an
    independent oracle for tests; O(N) Python steps):

    ``z_t = logaddexp(z_{t−1}, f_t)``, ``λ_t = exp(z_{t−1} − z_t)``, ``k̃_t = exp(f_t − z_t) ⊙ κ_t``,
    ``S_t = diag(λ_t) S_{t−1} + k̃_t v_tᵀ``, ``o_t = q_tᵀ S_t``.
    """
    acc = accumulation_dtype(q.dtype)
    B, N, H, Dk = q.shape
    state = q.new_zeros(B, H, Dk, v.shape[-1], dtype=acc)
    z = torch.full((B, H, Dk), lse_init, dtype=acc, device=q.device)
    outs = []
    for t in range(N):
        f = k[:, t].to(acc)
        z_new = torch.logaddexp(z, f)
        lam = torch.exp(z - _safe(z_new))
        kt = torch.exp(f - _safe(z_new))
        if k_mod is not None:
            kt = kt * k_mod[:, t].to(acc)
        state = lam.unsqueeze(-1) * state + kt.unsqueeze(-1) * v[:, t].to(acc).unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), state))
        z = z_new
    return torch.stack(outs, 1).to(q.dtype)

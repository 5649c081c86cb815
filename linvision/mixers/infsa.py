"""InfSA / Linear-InfSA: Frobenius-normalised ReLU attention, and its rank-1 pooled-query linear variant.

Paper: "Infinite Self-Attention", Roffo & Palmer, arXiv 2603.00175 (2026). Official code:
``giorgioroffo/infinite-self-attention: infsa/attention.py::InfSAAttention`` and
``infsa/core.py::{pure_infsa_scores, linear_infsa_scores, infsa_attention}`` at commit
``4a37fc02bb2d323462e696e3118df25043d839be``. The operators live in :mod:`linvision.kernels.infsa`.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.infsa import linear_infsa, linear_infsa_pooled_streamed, linear_infsa_scores, pure_infsa, pure_infsa_scores
from ..kernels.validation import check_bool, check_choice, check_float
from .base import QKVMixer
from .token_chunks import chunk_tokens

MODES = ("linear", "quadratic")


class InfSAAttention(QKVMixer):
    """Infinite Self-Attention as a token mixer: ``y = proj(InfSA(q, k, v))``, ``x, y: (B, N, C)``.

    Per head (``d = C/H``, ``q̂ = q/√d``, ``k̂ = k/√d``, ``ρ = sigmoid(rho_logit)``):

    - ``mode="linear"`` (default; the paper's headline "Linear InfViT"): ``w_i = ‖q̂_i‖/(Σ‖q̂‖ + eps)``,
      ``q̄ = Σ_i w_i q̂_i``, ``a_j = ReLU(q̄·k̂_j)/(Σ_l ReLU(q̄·k̂_l) + eps)``, and **every** token gets the
      same ``ρ Σ_j a_j v_j``: rank-1 token mixing, O(N·d). Per-token differences come only from the
      residual path and the MLP of the host block. ``proj`` is applied once to that vector. On the PyTorch
      path ``q̄`` and ``Σ_j a_j v_j`` are sums over chunks of tokens (a pass projecting the queries, then one
      projecting keys and values), so the ``[B, N, 3C]`` projection is never held whole.
    - ``mode="quadratic"`` ("pure InfSA"): ``o = ρ · A/(‖A‖_F + eps) · V`` with ``A = ReLU(q̂k̂ᵀ)`` (1/d
      total scaling, Frobenius norm over the whole N×N matrix per sample and head). O(N²·d).

    Every token, prefix tokens included, is an ordinary token (upstream has no notion of them): it is
    pooled into ``q̄`` and is a key; ``hw`` is not used. Weights: ``qkv`` (q, k, v blocks) and ``proj``,
    each block xavier-uniform with zero bias as upstream; ``rho_logit`` as upstream, so
    :func:`official_state_dict_to_linvision` loads an upstream ``InfSAAttention`` state dict.

    Options:

    - ``rho_init`` (0.95): initial ρ, stored as ``rho_logit = logit(ρ)``.
    - ``rho_learnable`` (False, upstream's behaviour): upstream declares ``rho_logit`` a Parameter but
      reads it with ``.item()``, so ρ never receives a gradient. By default ``rho_logit`` is a Parameter
      with ``requires_grad=False`` (the same constant ρ, without the host sync or graph break);
      ``True`` **deviates** and makes ρ trainable (gradient through the sigmoid).
    - ``per_token`` (False): **deviation** fixing the rank-1 output in linear mode: each token uses its own
      query, ``o_i = ρ Σ_j (φ(q̂_i)·φ(k̂_j)) v_j / (Σ_l φ(q̂_i)·φ(k̂_l) + eps)``, ``φ = ReLU`` (the ReLU
      moved onto the features keeps the cost linear). Not available in quadratic mode.
    - ``attn_drop`` (0.0): dropout on the attention scores in training (upstream's ``dropout``), applied
      on the PyTorch path (not with ``per_token``); ``eps`` (1e-6); ``backend`` of the kernels.

    Other deviations, outputs unchanged: fused ``qkv`` instead of ``q_proj``/``k_proj``/``v_proj``
    (same init per block); the Triton quadratic path never stores the N×N matrix; no
    ``need_weights``, masks or ``is_causal`` (upstream accepts and ignores them; this mixer is
    bidirectional). Upstream's ``InfSAAttention`` defaults to ``variant="pure_infsa"``; this mixer
    defaults to the linear variant, the one the library is for.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        mode: str = "linear",
        rho_init: float = 0.95,
        rho_learnable: bool = False,
        per_token: bool = False,
        attn_drop: float = 0.0,
        eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        self.mode = check_choice("mode", mode, MODES)
        rho_init = check_float("rho_init", rho_init, min=0.0, max=1.0, min_open=True, max_open=True)
        self.rho_learnable = check_bool("rho_learnable", rho_learnable)
        self.per_token = check_bool("per_token", per_token)
        self.attn_drop = check_float("attn_drop", attn_drop, min=0.0, max=1.0, max_open=True)
        self.eps = check_float("eps", eps, min=0.0)
        self.backend = check_backend(backend)
        if per_token and mode != "linear":
            raise ValueError("per_token applies to mode='linear' only")
        if per_token and attn_drop > 0:
            raise ValueError("attn_drop is not supported with per_token=True (no score matrix to drop from)")
        self.rho_logit = nn.Parameter(torch.tensor(math.log(rho_init / (1.0 - rho_init))), requires_grad=self.rho_learnable)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Upstream's init: xavier-uniform q, k, v and output weights (each a C×C block), zero biases."""
        with torch.no_grad():
            for block in self.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(block)
            nn.init.xavier_uniform_(self.proj.weight)
            for lin in (self.qkv, self.proj):
                if lin.bias is not None:
                    lin.bias.zero_()

    @property
    def rho(self) -> Tensor:
        """ρ = sigmoid(rho_logit) as a 0-dim tensor, fp32 (fp64 in an fp64 module); detached unless
        ``rho_learnable``."""
        rho = torch.sigmoid(self.rho_logit.to(accumulation_dtype(self.rho_logit.dtype)))
        return rho if self.rho_learnable else rho.detach()

    def pooled(self, x: Tensor, rho: Tensor) -> Tensor:
        """Linear-InfSA's pooled vector ``[B, H, d]`` (``x`` dtype) of ``x (B, N, C)``, projected chunk by chunk: the
        queries in a first pass over the tokens (``q̄``), keys and values in a second (the ``a``-weighted sum of
        ``v``), each from its rows of ``qkv``, so the ``[B, N, 3C]`` projection is never held whole."""
        B, N, C = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias

        def rows(a: int, b: int, part: slice) -> Tensor:  # contiguous rows: F.linear fuses the bias (as for x whole)
            return F.linear(x[:, a:b].contiguous(), weight[part], None if bias is None else bias[part])

        def keys(a: int, b: int) -> Tuple[Tensor, Tensor]:
            return tuple(rows(a, b, slice(C, None)).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(2))

        return linear_infsa_pooled_streamed(lambda a, b: self.split_heads(rows(a, b, slice(C))), keys, N, N,
                                            step=chunk_tokens(B, 2 * C), rho=rho, eps=self.eps, backend=self.backend)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        B, N, C = x.shape
        rho = self.rho
        dropout = self.attn_drop > 0 and self.training
        if self.mode == "linear" and not self.per_token and not dropout:
            y = self.proj(self.pooled(x, rho).reshape(B, 1, C))  # the same row for every token: project it once
            return y.expand(B, N, C).contiguous()
        q, k, v = self.project_qkv(x)
        if self.mode == "quadratic":
            if dropout:
                scores = F.dropout(pure_infsa_scores(q, k, rho=rho, eps=self.eps), self.attn_drop)
                o = torch.einsum("bhnm,bmhd->bnhd", scores, v.to(scores.dtype)).to(x.dtype)
            else:
                o = pure_infsa(q, k, v, rho=rho, eps=self.eps, backend=self.backend)
            return self.proj(o.flatten(2))
        if self.per_token:
            o = linear_infsa(q, k, v, rho=rho, eps=self.eps, per_token=True, backend=self.backend)
            return self.proj(o.flatten(2))
        _, _, a = linear_infsa_scores(q, k, eps=self.eps)  # [B, N, H]; with dropout in training
        a = F.dropout(rho.to(a.dtype) * a, self.attn_drop)
        pooled = torch.einsum("bmh,bmhd->bhd", a, v.to(a.dtype)).to(x.dtype)
        return self.proj(pooled.reshape(B, 1, C)).expand(B, N, C).contiguous()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, mode={self.mode!r}, rho_learnable={self.rho_learnable}, "
            f"per_token={self.per_token}, attn_drop={self.attn_drop}, eps={self.eps}"
        )


def official_state_dict_to_linvision(state_dict: Mapping[str, Tensor], prefix: str = "") -> Dict[str, Tensor]:
    """Map an upstream ``InfSAAttention`` state dict (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``,
    ``rho_logit``) to this mixer's keys (``qkv``, ``proj``, ``rho_logit``). Keys outside ``prefix`` pass through.

    Upstream with ``kdim``/``vdim`` other than ``embed_dim`` (cross-attention) has no counterpart here.
    """
    out = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    get = lambda name: state_dict[prefix + name]  # noqa: E731
    missing = [n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight", "rho_logit") if prefix + n not in state_dict]
    if missing:
        raise ValueError(f"not an InfSAAttention state dict: missing {[prefix + n for n in missing]}")
    out[prefix + "qkv.weight"] = torch.cat([get(f"{n}_proj.weight") for n in "qkv"], 0)
    if prefix + "q_proj.bias" in state_dict:
        out[prefix + "qkv.bias"] = torch.cat([get(f"{n}_proj.bias") for n in "qkv"], 0)
    out[prefix + "proj.weight"] = get("out_proj.weight")
    if prefix + "out_proj.bias" in state_dict:
        out[prefix + "proj.bias"] = get("out_proj.bias")
    out[prefix + "rho_logit"] = get("rho_logit")
    return out

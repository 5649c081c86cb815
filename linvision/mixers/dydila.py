"""DyDiLA: dynamic differential linear attention, for linear diffusion transformers (DyDi-LiT).

Paper: "Dynamic Differential Linear Attention: Enhancing Linear Diffusion Transformer for High-Quality
Image Generation" (Cao et al., arXiv 2601.13683). **No official code** and no checkpoints exist; this
file follows the team spec ``shared/spec/dydila.md``, whose equations come from a secondary review quoting the
paper [2nd] and from a third-party port [UNVERIFIED]. Every choice below is therefore a documented
deviation, to revisit once the paper's PDF has been checked.

Forward (``x (B, N, C)``, ``N = num_prefix_tokens + h·w``, ``H`` heads of ``d = C/H``; per head)::

    Q, K, V   = split(qkv(x))                                     shared projections, (B, N, H, d)
    Q'_i      = x_i W_Q^{u_i},  u_i = argmax(x_i R^P_Q)           (i) dynamic projection, n_P experts
    K'_i      = x_i W_K^{v_i},  v_i = argmax(x_i R^P_K)
    Q̃, Q̃'    = φ_{γ^Q_i}(Q_i), φ_{γ^Q_i}(Q'_i)                   (ii) dynamic measure kernel
    K̃, K̃'    = φ_{γ^K_j}(K_j), φ_{γ^K_j}(K'_j)
    φ_γ(z)    = r^γ · ‖r‖ / ‖r^γ‖,   r = ReLU(z) + 1e-6          norms over the head's d dims
    Q̂         = Q̃ − λ^Q_i Q̃',   K̂ = K̃ − λ^K_j K̃'                (iii) token differential operator
    O         = Q̂ · (1/N Σ_j K̂_jᵀ V_j) / (Q̃ · mean_j K̃_j + 1e-6)      via linear_attention
    y         = proj(concat_heads(O) + DWC(V))                    LiT's 5×5 depth-wise conv

``γ^Q_i`` and ``γ^K_j`` are routed per token (argmax) from ``n_K`` learnable exponents (initialised at 3),
``λ^Q_i`` and ``λ^K_j`` from ``n_D`` learnable scalars (initialised at 0.01). Each of the three parts has
a switch (``dynamic_projection``, ``dynamic_kernel``, ``differential``) for ablations. With all three off
the mixer is the baseline below, LiT's linear attention::

    y = proj( linear_attention(ReLU(Q)+1e-6, ReLU(K)+1e-6, V, mean=True, eps=1e-6) + DWC(V) )

Implementation choices (the spec's open points, in its terms; none is confirmed by the paper):

- **Baseline** ("a refined LiT"): :class:`~linvision.mixers.lit.LiTAttention` itself, which this class
  extends: its ``qkv``/``proj`` (softmax weights load as they are; ``from_softmax`` works here too), ReLU
  kernel with offset 1e-6, ``1/N`` mean normalisation with ``eps=1e-6``, and its DWC branch (5×5, one
  filter bank shared by the heads unless ``dwc_shared_across_heads=False``). ``dwc=False`` drops the DWC
  (whether DyDi-LiT keeps it is unknown). With the three switches off and ``dwc=True`` the module equals
  ``LiTAttention`` with the same state dict.
- **Dynamic projection**: routers ``R^P`` read the mixer input ``x``; the ``n_P`` experts of Q' (and of
  K') are one ``Linear(C, n_P·C, bias=False)``, all evaluated, then the routed one is selected
  (``2·n_P·C²`` expert and ``2·C·n_P`` router parameters, as the spec counts). Q' and K' only feed the
  differential operator, so ``dynamic_projection=True`` needs ``differential=True``. Off: one static
  redundancy projector each for Q' and K' (``n_P = 1``, no routing).
- **Dynamic measure kernel**: the FLatten-style norm-preserving power map of the spec's port, applied
  per head (norms over ``d`` dims, not over all ``C``) in fp32, computed as ``φ(r) = s^γ ‖r‖ / ‖s^γ‖`` with
  ``s = r / max(r)`` (identical in exact arithmetic; it cannot underflow or divide by zero). Separate
  routers and exponent tables for queries and keys; a token's Q' uses its query exponent and K' its key
  exponent. Exponents are clamped to ``γ ≥ 0`` when used. Off: the plain ReLU kernel (``γ = 1``).
- **Token differential operator**: λ is one scalar per token (shared by heads and channels), with
  separate routers and tables for λ^Q and λ^K. λ^K is applied to each key before the state is formed,
  so there is **one** ``d×d`` state per head. No ReLU after the difference (``relu_after_diff=False``; True
  clamps Q̂, K̂ at 0). Off: Q̂ = Q̃, K̂ = K̃, and Q', K' are not built.
- **Normaliser** (``denominator``): ``"kernel"`` (default) takes the denominator from the undifferenced
  kernel features Q̃, K̃, which are positive, so it never needs a clamp (the numerator-only trick of
  NaLaFormer's RoPE; row weights then need not sum to 1). ``"differential"`` is the spec's clamped form,
  ``max(Q̂·mean K̂, den_min) + eps``. ``"none"`` drops the normaliser (``O = Q̂ · 1/N Σ K̂ᵀV``). Without
  the differential operator ``"kernel"`` and ``"differential"`` are the same.
- **Routing gradient** (``router_grad``): ``"ste"`` (default) is a straight-through estimator: the forward
  uses the hard argmax one-hot ``h``, the backward that of ``h + p − stopgrad(p)``, ``p = softmax(logits)``.
  ``"none"``: no estimator; the routers are frozen (``requires_grad=False``) at their random init.
- **Router inputs and counts**: every router is a bias-free ``Linear(C, n)`` on ``x``, one decision per
  token shared by all heads; ``num_projectors = num_kernels = num_lambdas = 4`` by default (the paper's
  values are unknown). A count of 1 means a static (learned, unrouted) projector, exponent or λ.
- **Prefix tokens**: ordinary tokens for routing and attention (they are queries and keys and count in
  the ``1/N`` mean); the DWC sees only the ``h×w`` image tokens and is zero for prefix tokens (LiT's rule).
- **Precision**: the kernel features, the routed scalars and the core are fp32 (fp64 for fp64 inputs); the
  output is cast to the input dtype before ``proj``. The core always goes through
  :func:`linvision.kernels.linear_attn.linear_attention`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype
from ..kernels.linear_attn import linear_attention
from ..kernels.linear_attn.streamed import linear_attention_streamed
from ..kernels.validation import check_bool, check_choice, check_float, check_int
from .lit import FEATURE_OFFSET, LiTAttention
from .token_chunks import TokenRows, map_token_ranges, reusable_output
from .token_conv import depthwise_conv_reach

DENOMINATORS = ("kernel", "differential", "none")
ROUTER_GRADS = ("ste", "none")


def power_kernel(z: Tensor, gamma: Optional[Tensor], offset: float) -> Tensor:
    """φ_γ(z) = r^γ ‖r‖/‖r^γ‖ with r = ReLU(z) + offset over the last dim, in ``z``'s dtype.

    ``gamma``: broadcastable to ``z[..., :1]`` (one exponent per vector), or None for ``r`` itself (γ = 1).
    Evaluated as ``s^γ ‖r‖/‖s^γ‖`` with ``s = r/max(r)``, so ``‖s^γ‖ ≥ 1`` (no underflow, no 0/0).
    """
    r = F.relu(z) + offset if offset else F.relu(z)
    if gamma is None:
        return r
    s = r / r.amax(-1, keepdim=True).clamp_min(torch.finfo(r.dtype).tiny)
    sp = s ** gamma.clamp_min(0.0)
    norm_sp = torch.linalg.vector_norm(sp, dim=-1, keepdim=True).clamp_min(1.0)  # ≥ 1 already unless r == 0
    return sp * (torch.linalg.vector_norm(r, dim=-1, keepdim=True) / norm_sp)


class DyDiLA(LiTAttention):
    """Dynamic differential linear attention; ``x (B, N, C) → (B, N, C)``, linear in ``N``.

    Switches: ``dynamic_projection`` (routed redundancy projectors, needs ``differential``),
    ``dynamic_kernel`` (routed power kernel), ``differential`` (subtract λ·redundancy); all off gives
    the LiT baseline. Sizes: ``num_projectors`` (n_P), ``num_kernels`` (n_K), ``num_lambdas`` (n_D);
    inits ``gamma_init`` (3.0), ``lambda_init`` (0.01). Other options: ``router_grad`` (``"ste"``|``"none"``),
    ``denominator`` (``"kernel"``|``"differential"``|``"none"``), ``den_min`` (clamp of the differential
    denominator), ``relu_after_diff``, ``dwc``, and LiT's ``dwc_kernel_size``, ``dwc_shared_across_heads``,
    ``eps``, ``backend``, ``qkv_bias``, ``proj_bias``.
    The module docstring gives the equations and every implementation choice.
    """

    joint_attention = False  # a LiT subclass, but no joint text+image processor serves its dynamic terms

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        dynamic_projection: bool = True,
        dynamic_kernel: bool = True,
        differential: bool = True,
        num_projectors: int = 4,
        num_kernels: int = 4,
        num_lambdas: int = 4,
        gamma_init: float = 3.0,
        lambda_init: float = 0.01,
        router_grad: str = "ste",
        denominator: str = "kernel",
        den_min: float = 0.0,
        relu_after_diff: bool = False,
        dwc: bool = True,
        dwc_kernel_size: int = 5,
        dwc_shared_across_heads: bool = True,
        eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__(
            dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, dwc_kernel_size=dwc_kernel_size,
            dwc_shared_across_heads=dwc_shared_across_heads, eps=eps, backend=backend,
        )
        self.dynamic_projection = check_bool("dynamic_projection", dynamic_projection)
        self.dynamic_kernel = check_bool("dynamic_kernel", dynamic_kernel)
        self.differential = check_bool("differential", differential)
        self.relu_after_diff = check_bool("relu_after_diff", relu_after_diff)
        self.use_dwc = check_bool("dwc", dwc)
        if dynamic_projection and not differential:
            raise ValueError(
                "dynamic_projection=True needs differential=True: the routed projections only produce the "
                "redundancy terms Q', K' that the differential operator subtracts; pass dynamic_projection=False"
            )
        num_projectors = check_int("num_projectors", num_projectors, min=1)
        num_kernels = check_int("num_kernels", num_kernels, min=1)
        num_lambdas = check_int("num_lambdas", num_lambdas, min=1)
        gamma_init = check_float("gamma_init", gamma_init, min=0.0)
        lambda_init = check_float("lambda_init", lambda_init)
        self.den_min = check_float("den_min", den_min, min=0.0)
        self.router_grad = check_choice("router_grad", router_grad, ROUTER_GRADS)
        self.denominator = check_choice("denominator", denominator, DENOMINATORS)

        def router(n: int) -> Optional[nn.Linear]:
            if n == 1:
                return None
            lin = nn.Linear(dim, n, bias=False)
            lin.weight.requires_grad_(router_grad == "ste")
            return lin

        self.num_projectors = num_projectors if dynamic_projection else 1
        self.num_kernels = num_kernels if dynamic_kernel else 0
        self.num_lambdas = num_lambdas if differential else 0
        if differential:
            # (i) redundancy projectors: experts W^1..W^{n_P} of Q' and of K', and their routers.
            self.redundancy_q = nn.Linear(dim, self.num_projectors * dim, bias=False)
            self.redundancy_k = nn.Linear(dim, self.num_projectors * dim, bias=False)
            self.proj_router_q = router(self.num_projectors)
            self.proj_router_k = router(self.num_projectors)
            # (iii) λ tables and routers.
            self.lambda_q = nn.Parameter(torch.full((num_lambdas,), lambda_init))
            self.lambda_k = nn.Parameter(torch.full((num_lambdas,), lambda_init))
            self.diff_router_q = router(num_lambdas)
            self.diff_router_k = router(num_lambdas)
        if dynamic_kernel:
            # (ii) exponent tables and routers.
            self.gamma_q = nn.Parameter(torch.full((num_kernels,), gamma_init))
            self.gamma_k = nn.Parameter(torch.full((num_kernels,), gamma_init))
            self.kernel_router_q = router(num_kernels)
            self.kernel_router_k = router(num_kernels)
        if not dwc:
            self.dwc = None  # LiT's DWC branch removed

    # -- routing ---------------------------------------------------------------------------------
    def route(self, router: Optional[nn.Linear], x: Tensor) -> Optional[Tensor]:
        """Routing weights ``(B, N, n)`` fp32 (fp64 for fp64 x): one-hot of the argmax forward; STE gradient if enabled.

        None for a single expert (no routing: the caller uses expert 0).
        """
        if router is None:
            return None
        logits = router(x).to(accumulation_dtype(x.dtype))
        hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        if self.router_grad == "ste":
            p = logits.softmax(-1)
            return hard + (p - p.detach())
        return hard

    def routed_scalar(self, router: Optional[nn.Linear], table: Tensor, x: Tensor) -> Tensor:
        """One routed value of ``table`` per token: ``(B, N, 1, 1)`` fp32 (fp64), to broadcast over ``[B, N, H, d]``."""
        weights = self.route(router, x)
        if weights is None:
            value = table.to(accumulation_dtype(x.dtype))[0].expand(x.shape[:2])
        else:
            value = (weights * table.to(weights.dtype)).sum(-1)
        return value[..., None, None]

    def redundancy(self, experts: nn.Linear, router: Optional[nn.Linear], x: Tensor) -> Tensor:
        """Q' (or K'): the routed expert's projection of each token, fp32 (fp64) ``[B, N, H, d]``."""
        y = experts(x).to(accumulation_dtype(x.dtype))
        if self.num_projectors > 1:
            weights = self.route(router, x)  # (B, N, n_P)
            y = torch.einsum("bnp,bnpc->bnc", weights, y.unflatten(-1, (self.num_projectors, self.dim)))
        return y.unflatten(-1, (self.num_heads, self.head_dim))

    # -- forward ---------------------------------------------------------------------------------
    def attention(
        self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, output: Optional[Callable[[int, int, Tensor], Tensor]] = None
    ) -> Tensor:
        """Core: ``x (B, N, C)`` (router input), q, k, v ``[B, N, H, d]`` → ``o [B, N, H, d]``; with ``output``,
        the stacked ``output(a, b, o[:, a:b])`` over chunks of tokens instead (token-wise epilogue)."""
        return self.attention_rows(x, lambda a, b: q[:, a:b], lambda a, b: k[:, a:b], v, output)

    def attention_rows(
        self, x: Tensor, q: TokenRows, k: TokenRows, v: Tensor,
        output: Optional[Callable[[int, int, Tensor], Tensor]] = None, **out,
    ) -> Tensor:
        """:meth:`attention` with q and k as functions of a token range (``q(a, b)`` is ``q[:, a:b]``), each range
        asked for once, so that they need not be held whole. ``out``: ``out``/``out_lag`` of
        ``linear_attention_streamed`` (the buffer the epilogue's results go into), used by its streamed forms."""
        N = v.shape[1]
        plain = "none" if self.denominator == "none" else "div"
        if not (self.dynamic_kernel or self.differential):  # the LiT baseline, features fused in the kernel
            return linear_attention_streamed(
                lambda a, b: (q(a, b), None), lambda a, b: (k(a, b), None), v, N, normalize=plain,
                mean=True, eps=self.eps, feature_map="relu", feature_offset=FEATURE_OFFSET, output=output,
                backend=self.backend, **out,
            )
        acc = accumulation_dtype(x.dtype)
        v = v.to(acc)
        queries, keys = self.features("q", q, x), self.features("k", k, x)
        if not (self.differential and self.denominator == "differential"):
            # features chunk by chunk of tokens: no full [B, N, H, d] temporary (linear_attention_streamed)
            return linear_attention_streamed(
                queries, keys, v, N, normalize=plain, mean=True, eps=self.eps, output=output, backend=self.backend,
                **out,
            )
        (q_diff, _), (k_diff, _) = queries(0, N), keys(0, N)
        num = linear_attention(q_diff, k_diff, v, normalize="none", mean=True, backend=self.backend)
        den = torch.einsum("bnhd,bhd->bnh", q_diff, k_diff.mean(1)).clamp_min(self.den_min) + self.eps
        o = num / den.unsqueeze(-1)
        return o if output is None else map_token_ranges(lambda a, b: output(a, b, o[:, a:b]), *o.shape[:2], self.dim)

    def features(self, side: str, t: TokenRows, x: Tensor) -> Callable[[int, int], Tuple[Tensor, Optional[Tensor]]]:
        """Features of tokens ``a:b`` of one side (``side`` ``"q"`` or ``"k"``, ``t(a, b)`` its ``[B, b − a, H, d]``
        rows, router input
        ``x (B, N, C)``): ``(numerator, denominator or None)``, fp32 (fp64) ``[B, b − a, H, d]``. Token-wise.

        Numerator Q̂ (K̂) with the differential operator, else Q̃ (K̃); denominator Q̃ (K̃) for
        ``denominator="kernel"`` with the differential operator, else None (the numerator's own).
        """
        acc = accumulation_dtype(x.dtype)
        module = lambda name: getattr(self, f"{name}_{side}", None)  # noqa: E731  (absent when switched off)

        def of(a: int, b: int) -> Tuple[Tensor, Optional[Tensor]]:
            xs = x[:, a:b]
            gamma = self.routed_scalar(module("kernel_router"), module("gamma"), xs) if self.dynamic_kernel else None
            feat = power_kernel(t(a, b).to(acc), gamma, FEATURE_OFFSET)
            if not self.differential:
                return feat, None
            red = power_kernel(self.redundancy(module("redundancy"), module("proj_router"), xs), gamma, FEATURE_OFFSET)
            diff = feat - self.routed_scalar(module("diff_router"), module("lambda"), xs) * red
            if self.relu_after_diff:
                diff = F.relu(diff)
            return diff, (feat if self.denominator == "kernel" else None)

        return of

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        q, k, v = self.qkv_rows(x)  # projected per range of tokens
        v = v(0, x.shape[1])  # whole: the DWC of a chunk reads the rows around it

        def output(a: int, b: int, o: Tensor) -> Tensor:  # token-wise, in chunks of tokens: cache-sized temporaries
            o = o.flatten(2)
            if self.dwc is not None:
                o = o + self.local_term(v, hw, num_prefix_tokens, a, b).to(o.dtype)
            return self.proj(o.to(x.dtype))

        # the outputs go into v's own buffer when it is one, each chunk once the DWC reads none of its rows
        reuse = reusable_output(v, x, depthwise_conv_reach(hw, self.dwc_kernel_size) if self.dwc is not None else 0)
        return self.attention_rows(x, q, k, v, output, **reuse)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, dynamic_projection={self.dynamic_projection}, "
            f"dynamic_kernel={self.dynamic_kernel}, differential={self.differential}, "
            f"n_P={self.num_projectors}, n_K={self.num_kernels}, n_D={self.num_lambdas}, "
            f"router_grad={self.router_grad!r}, denominator={self.denominator!r}, den_min={self.den_min:g}, "
            f"relu_after_diff={self.relu_after_diff}, dwc={self.use_dwc}"
        )


__all__ = ["DyDiLA", "power_kernel", "DENOMINATORS", "ROUTER_GRADS"]

"""LightNet: the additive (log-sum-exp normalised) linear recurrence with MD-LRPE and MD-TPE.

Paper: Qin et al., "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet",
arXiv 2405.21022 (2024). The official repository ``OpenNLPLab/LightNet`` (which holds the vision code)
could not be read, so this module follows the first author's maintained implementations, read at:

- ``Doraemonzzz/xmixers: xmixers/modules/token_mixers/linear_attention/lightnet_attention.py::LightNetAttention
  @081fbef45ad8056eff4e24b414306575494fc095`` (projections, SiLU on q, raw k as log-weights, logcumsumexp
  normaliser, low-rank sigmoid output gate before an RMSNorm, ``o_proj``);
- ``Doraemonzzz/xmixers: xmixers/modules/pes/tpe.py::Tpe @3e09249d82d4e8f580d9517d165be54a7edaf379`` and
  ``xmixers/modules/pes/md/md_tpe.py::MdTpe @41b22a8e53ea17faa8a82db785b486fe35690c77`` (MD-TPE);
- ``Doraemonzzz/xopes: xopes/ops/lrpe/cosine/_md/lrpe_cosine_md_torch.py::lrpe_cosine_md_torch
  @102618f3d930e956a8adf88a3cfa24fcc6833365`` and its README (MD-LRPE: per-axis angle chunks, prefix
  tokens at angle 0), with ``Doraemonzzz/vector-quantize: vector_quants/modules/pe/lrpe.py::MdLrpe``
  (cosine type 3) for the frequencies;
- ``fla-org/flash-linear-attention: fla/layers/lightnet.py::LightNetAttention
  @04506e15aea1430db28f04159d52e67c6a5dbc36`` for the alternative gate placement.

All of those are causal language-model code; the non-causal multi-dimensional form is their direct
specialisation (spec ``lightnet.md``). Nothing here is checked against the paper's vision models.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.additive_recurrence import additive_scan, additive_scan_streamed
from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.validation import check_bool, check_choice, check_float, check_int, check_optional
from .base import QKVMixer
from .token_chunks import map_token_chunks

GATE_POSITIONS = ("pre", "post")
LRPE_THETAS = ("per_head", "shared")
Q_ACTIVATIONS = ("silu", "none")
TPE_MODES = ("add", "replace")
TPE_DIRECTIONS = ("bidirectional", "causal")


# ----------------------------------------------------------------------------------------------------------
# MD-LRPE
# ----------------------------------------------------------------------------------------------------------


def md_lrpe_theta(
    num_heads: int,
    head_dim: int,
    ndim: int = 2,
    base: float = 10000.0,
    layout: str = "per_head",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Frequencies ``θ [H, e]`` in ``dtype`` (computed in fp64), ``e = ⌈head_dim / ndim⌉``.

    ``"per_head"`` (default; vector-quantize ``MdLrpe``, cosine type 3): ``θ[h, c] = base^{−2(h·d + c)/(H·d)}``,
    i.e. the ``H·d`` frequencies ``base^{−2j/(H·d)}`` split by head, the first ``e`` of each head used.
    ``"shared"``: ``θ[h, c] = base^{−2c/d}`` for every head (the spec's literal ``θ_c = base^{−2c/d}``).
    """
    check_choice("lrpe_theta", layout, LRPE_THETAS)
    e = -(-head_dim // ndim)
    c = torch.arange(e, dtype=torch.float64)
    if layout == "per_head":
        j = torch.arange(num_heads, dtype=torch.float64)[:, None] * head_dim + c[None, :]
        theta = base ** (-2.0 * j / (num_heads * head_dim))
    else:
        theta = (base ** (-2.0 * c / head_dim)).expand(num_heads, e)
    return theta.to(dtype).contiguous()


def grid_positions(shape: Sequence[int], device=None) -> Tensor:
    """Integer coordinates ``[prod(shape), len(shape)]`` of a grid in raster order (last axis fastest)."""
    axes = [torch.arange(check_int("shape", n, min=0), device=device) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes))


def md_lrpe_angles(theta: Tensor, shape: Sequence[int], num_prefix_tokens: int, head_dim: int, start: int = 0,
                   stop: Optional[int] = None) -> Tensor:
    """Angles ``Θ [P + prod(shape), H, head_dim]`` in θ's dtype: ``Θ_s = concat_j(s_j θ)[:head_dim]``, prefix
    tokens at 0; only tokens ``start:stop`` when given (``[stop − start, H, head_dim]``).

    Channel chunk ``j`` (of ``e = θ.shape[1]`` channels) carries axis ``j`` (rows, then columns, ...), as in
    xopes' ``lrpe_cosine_md_torch``. Built per call from ``shape``; nothing is cached.
    """
    P = num_prefix_tokens
    stop = P + math.prod(shape) if stop is None else stop
    pos = grid_positions(shape, device=theta.device)[max(start - P, 0) : max(stop - P, 0)].to(theta.dtype)  # [n, m]
    ang = pos[:, None, :, None] * theta[None, :, None, :]  # [n, H, m, e]
    ang = ang.flatten(2)[..., :head_dim]
    prefix = max(0, min(stop, P) - start)
    if prefix:
        ang = torch.cat([ang.new_zeros(prefix, *ang.shape[1:]), ang], 0)
    return ang


def md_lrpe(x: Tensor, angles: Tensor) -> Tensor:
    """Cosine LRPE: ``x [B, N, H, d] ↦ [x ⊙ cos Θ, x ⊙ sin Θ] [B, N, H, 2d]`` (computed in fp32, fp64 for fp64
    ``x``; returned in x's dtype).

    ``x̄_s · ȳ_t = Σ_c x_c y_c cos(Θ_{s,c} − Θ_{t,c})``: relative per axis, no channel mixing.
    """
    xf = x.to(accumulation_dtype(x.dtype))
    angles = angles.to(xf.dtype)
    return torch.cat([xf * angles.cos(), xf * angles.sin()], -1).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# MD-TPE
# ----------------------------------------------------------------------------------------------------------


TPE_CHUNK = 32  # positions per chunk of the chunked decay filter (dense inside a chunk, carried across)


def decay_filter(g: Tensor, log_decay: Tensor, causal: bool, chunk: int = TPE_CHUNK) -> Tensor:
    """``y[..., t] = Σ_s λ^{|t−s|} g[..., s]`` along the last dim (``causal``: over ``s ≤ t`` only, ``λ^{t−s}``).

    ``g [..., H, d, L]``, ``log_decay [H]`` (``log λ ≤ 0``) → ``[..., H, d, L]`` in ``g``'s dtype. Chunked: the
    ``L`` positions are cut into chunks of ``chunk``; inside a chunk the decay matrix is applied densely, and the
    sums of the chunks before (and, bidirectional, after) reach it as one carried state per direction, decayed by
    ``λ^chunk`` per chunk. ``O(L·chunk)`` per line instead of the ``O(L²)`` of the full Toeplitz matrix.
    """
    L = g.shape[-1]
    c = min(chunk, L)
    n = -(-L // c)
    x = F.pad(g, (0, n * c - L)).unflatten(-1, (n, c))  # [..., H, d, n, c], zeros past the end
    ll = log_decay.to(g.dtype)[:, None]  # [H, 1]
    i = torch.arange(c, device=g.device, dtype=g.dtype)
    dist = i[:, None] - i[None, :]
    inside = torch.exp(dist.abs() * ll[:, :, None])  # [H, c, c]
    if causal:
        inside = inside.masked_fill(dist < 0, 0.0)
    y = torch.einsum("hij,...hdnj->...hdni", inside, x)
    if n == 1:
        return y.flatten(-2)[..., :L]
    per_chunk = torch.exp(c * ll)[:, :, None]  # [H, 1, 1]: λ^c over [..., H, d, ·]

    def carried(into: Tensor, order) -> Tensor:
        """States entering each chunk ``[..., H, d, n]``: the decayed sum of the chunks visited before it in
        ``order``; ``into [..., H, d, n]`` each chunk's own contribution to the state it passes on."""
        states, state = [None] * n, torch.zeros_like(into[..., 0])
        for j in order:
            states[j] = state
            state = state * per_chunk[..., 0] + into[..., j]
        return torch.stack(states, -1)

    forward = carried(torch.einsum("...hdnj,hj->...hdn", x, torch.exp((c - 1 - i) * ll)), range(n))
    y = y + forward[..., None] * torch.exp((i + 1) * ll)[:, None, None]  # λ^{i+1} for position i of a chunk
    if not causal:
        backward = carried(torch.einsum("...hdnj,hj->...hdn", x, torch.exp(i * ll)), range(n - 1, -1, -1))
        y = y + backward[..., None] * torch.exp((c - i) * ll)[:, None, None]  # λ^{c−i}
    return y.flatten(-2)[..., :L]


class MdTpe(nn.Module):
    """Multi-dimensional Toeplitz positional encoding (xmixers ``MdTpe`` of ``Tpe``, one per grid axis, summed).

    Per axis ``a``, head ``h``: ``y_t = (q_{a,h}·k_{a,h}) Σ_s λ_{a,h}^{|t−s|} x_s`` along that axis
    (``bidirectional``) or ``Σ_{s≤t} λ^{t−s} x_s`` (``causal``, xmixers), ``λ = sigmoid(log_decay)``;
    then a per-head RMSNorm (with weight) and a ``Linear(C, C, bias=False)``. The axes' outputs are summed.
    Shapes: ``x (B, P + h·w, C)`` → ``(B, P + h·w, C)``; the ``P`` prefix tokens are not on the grid and
    get a zero output. The filter runs chunked (:func:`decay_filter`: ``O(N·C·chunk)``, linear in the tokens);
    :meth:`toeplitz` gives the full decay matrix of an axis (the reference).

    Initialisation as xmixers: ``q, k ~ N(0, 1)``, ``log_decay ~ N(0, 1)``, norm weight 1. As in xmixers,
    the per-head RMSNorm cancels the ``q·k`` scale up to its eps (only its sign survives), so ``q`` and ``k``
    receive near-zero gradients.
    """

    def __init__(self, dim: int, num_heads: int, ndim: int = 2, direction: str = "bidirectional", eps: float = 1e-6):
        super().__init__()
        check_choice("direction", direction, TPE_DIRECTIONS)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be a multiple of num_heads={num_heads}")
        self.dim, self.num_heads, self.ndim, self.direction, self.eps = dim, num_heads, ndim, direction, eps
        self.q = nn.Parameter(torch.randn(ndim, dim))
        self.k = nn.Parameter(torch.randn(ndim, dim))
        self.log_decay = nn.Parameter(torch.randn(ndim, num_heads))
        self.norm_weight = nn.Parameter(torch.ones(ndim, dim))
        self.o_proj = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(ndim))

    def toeplitz(self, axis: int, length: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[H, L, L]`` decay matrix of one axis, built in ``dtype`` (fp32, or fp64 for fp64 inputs)."""
        i = torch.arange(length, device=self.log_decay.device, dtype=dtype)
        dist = i[:, None] - i[None, :]
        log_lam = F.logsigmoid(self.log_decay[axis].to(dtype))[:, None, None]
        if self.direction == "causal":
            return torch.exp(dist.clamp(min=0) * log_lam).masked_fill(dist < 0, 0.0)
        return torch.exp(dist.abs() * log_lam)

    def forward(self, x: Tensor, hw: Tuple[int, ...], num_prefix_tokens: int = 0) -> Tensor:
        if len(hw) != self.ndim:
            raise ValueError(f"expected a {self.ndim}-D grid, got hw={tuple(hw)}")
        B, N, C = x.shape
        H, d = self.num_heads, C // self.num_heads
        grid = x[:, num_prefix_tokens:].reshape(B, *hw, H, d)
        out = 0
        acc = accumulation_dtype(x.dtype)  # the Toeplitz sums and the norm (an fp16 sum could overflow)
        for a in range(self.ndim):
            g = grid.movedim(1 + a, -1).to(acc)  # [B, ..., H, d, L]
            log_decay = F.logsigmoid(self.log_decay[a].to(acc))
            y = decay_filter(g, log_decay, self.direction == "causal").movedim(-1, 1 + a)  # [B, *hw, H, d]
            scale = (self.q[a] * self.k[a]).view(H, d).sum(-1).to(acc)  # q·k per head
            y = y * scale[:, None]
            y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + self.eps)
            y = (y.to(x.dtype) * self.norm_weight[a].view(H, d).to(x.dtype)).reshape(B, -1, C)
            out = out + self.o_proj[a](y)
        if num_prefix_tokens:
            out = torch.cat([out.new_zeros(B, num_prefix_tokens, C), out], 1)
        return out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, ndim={self.ndim}, direction={self.direction!r}"


# ----------------------------------------------------------------------------------------------------------
# The mixer
# ----------------------------------------------------------------------------------------------------------


class LightNetAttention(QKVMixer):
    """LightNet token mixer: ``y = proj(norm-gate(AdditiveScan(lrpe(SiLU q), [k, k], v; κ = [cos Θ, sin Θ])))``.

    Shapes: ``x (B, N, C)`` with ``N = num_prefix_tokens + h·w`` (prefix tokens first, image tokens in
    raster order) → ``y (B, N, C)``; ``H = num_heads`` heads of ``d = C/H`` channels.

    Per head (xmixers ``LightNetAttention``, vector decay): ``q = SiLU(W_q x)``, ``f = W_k x`` (the raw key
    is the log-weight), ``v = W_v x``. With MD-LRPE the core sees ``q̄ = [q cos Θ, q sin Θ]``, log-weights
    ``[f, f]`` and key modulation ``κ = [cos Θ, sin Θ]``, so that ``o_i = Σ_j Σ_c q_ic P_jc cos(Θ_ic − Θ_jc) v_j``
    with ``P = softmax over tokens`` of ``f`` per channel (:func:`linvision.kernels.additive_recurrence.additive_scan`):

    - non-causal (default, ``causal=False``): one global softmax over all tokens: "You Only Scan Once";
    - causal (``causal=True``): the raster-order prefix softmax (prefix tokens first), i.e. LightNet's
      recurrence ``S_t = diag(e^{z_{t−1} − z_t}) S_{t−1} + e^{f_t − z_t} κ_t v_tᵀ``.

    Output (xmixers, ``gate_position="pre"``): ``proj(RMSNorm(o ⊙ σ(W_g2 W_g1 x)))`` with a low-rank gate of
    rank ``gate_rank`` (xmixers: ``num_heads``); ``"post"`` is FLA's ``RMSNorm(o) ⊙ SiLU(W_g2 W_g1 x)``.

    Prefix tokens join the softmax like any token; MD-LRPE gives them angle 0 (``[x, 0]``, xopes), so
    their interaction with image token ``t`` is ``Σ_c q_c k_c cos Θ_{t,c}``; MD-TPE gives them a zero term.

    Options (each an unverified choice; defaults follow the first author's code where it exists):

    - ``causal`` (False): see above. ``backend``: kernel backend.
    - ``lse_init`` (−inf): initial log-sum-exp ``z₀``. −inf is a pure softmax over the tokens (FLA, the
      spec's non-causal equation); ``0.0`` reproduces xmixers' ``lse_state = 0`` (a null key of weight 1).
      [UNVERIFIED which the paper's vision code uses.]
    - ``use_lrpe`` (True, xmixers default), ``lrpe_base`` (10000), ``lrpe_theta`` (``"per_head"``: the
      vector-quantize ``MdLrpe`` cosine-type frequency layout; ``"shared"``: ``base^{−2c/d}`` for all heads),
      ``lrpe_learnable`` (False: θ recomputed in fp32 each call; True: an fp32-initialised ``nn.Parameter``
      as xmixers' cosine ``Lrpe`` type 3; it follows ``.half()``/``.to()`` like any parameter, so keep it
      fp32 under mixed precision). The cosine form doubles the head dimension of q and k.
    - ``use_output_gate`` (True), ``gate_rank`` (None → ``num_heads``, xmixers), ``gate_position``
      (``"pre"`` xmixers / ``"post"`` FLA), ``norm_eps`` (1e-6).
    - ``q_activation`` (``"silu"``, both references; ``"none"``).
    - ``use_tpe`` (False), ``tpe_mode`` (``"add"``: ``x + MdTpe(x)``; ``"replace"``: image tokens replaced by
      ``MdTpe(x)`` as xmixers' LM replaces its embeddings), ``tpe_direction`` (None → ``"causal"`` when
      ``causal`` else ``"bidirectional"``). MD-TPE runs on the mixer input before the projections.
    - ``qkv_bias``, ``proj_bias`` (False, as xmixers' ``bias=False``; set True to inherit a biased softmax
      attention's weights). The gate's two Linears follow ``qkv_bias`` (xmixers uses one ``bias`` flag).

    Deviations (no official vision code; all are choices):

    - A fused ``qkv`` Linear (``q``, ``k``, ``v`` = its thirds) and ``proj`` instead of ``q_proj``/``k_proj``/
      ``v_proj``/``o_proj``, for softmax-weight inheritance; the output gate is ``gate`` and the norm ``norm``.
    - The non-causal multi-dimensional form (xmixers asserts ``causal``); with ``lse_init=−inf`` by default.
    - MD-LRPE frequencies: MdLrpe's per-head layout with xopes' ``e = ⌈d/m⌉`` chunks truncated to ``d``
      (MdLrpe uses ``d // m`` and fails when ``m ∤ d``). xmixers' ``LightNetAttention`` builds a rotary
      ``Lrpe(lrpe_type=6)`` yet doubles ``log_f`` as for the cosine type; the spec's cosine MD form is used.
    - MD-TPE inside the mixer (xmixers applies ``MdTpe`` once to the LM embeddings); default off, and
      bidirectional for the non-causal mixer [UNVERIFIED for the paper's vision MD-TPE].
    - No scalar-decay variant; xmixers' initialisation schemes (``token_mixer_init_type``, ``gain``) are not
      reproduced (PyTorch defaults); the core's ``scale`` is 1 (xmixers; FLA's chunk_gla default is
      ``d^-½``, which the following RMSNorm cancels up to its eps).
    - The normaliser runs in fp32 with a running max (both references cast to fp32 too).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        causal: bool = False,
        q_activation: str = "silu",
        lse_init: float = float("-inf"),
        use_lrpe: bool = True,
        lrpe_base: float = 10000.0,
        lrpe_theta: str = "per_head",
        lrpe_learnable: bool = False,
        use_output_gate: bool = True,
        gate_rank: Optional[int] = None,
        gate_position: str = "pre",
        norm_eps: float = 1e-6,
        use_tpe: bool = False,
        tpe_mode: str = "add",
        tpe_direction: Optional[str] = None,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias, proj_bias)
        self.causal = check_bool("causal", causal)
        self.q_activation = check_choice("q_activation", q_activation, Q_ACTIVATIONS)
        self.lse_init = check_float("lse_init", lse_init, allow_neg_inf=True)
        self.use_lrpe = check_bool("use_lrpe", use_lrpe)
        self.lrpe_base = check_float("lrpe_base", lrpe_base, min=0.0, min_open=True)
        self.lrpe_theta = check_choice("lrpe_theta", lrpe_theta, LRPE_THETAS)
        self.lrpe_learnable = check_bool("lrpe_learnable", lrpe_learnable)
        self.use_output_gate = check_bool("use_output_gate", use_output_gate)
        gate_rank = check_optional(check_int, "gate_rank", gate_rank, min=1)
        self.gate_position = check_choice("gate_position", gate_position, GATE_POSITIONS)
        norm_eps = check_float("norm_eps", norm_eps, min=0.0)
        self.use_tpe = check_bool("use_tpe", use_tpe)
        self.tpe_mode = check_choice("tpe_mode", tpe_mode, TPE_MODES)
        tpe_direction = check_optional(check_choice, "tpe_direction", tpe_direction, TPE_DIRECTIONS)
        self.backend = check_backend(backend)
        if use_lrpe and lrpe_learnable:
            self.theta = nn.Parameter(md_lrpe_theta(num_heads, self.head_dim, 2, lrpe_base, lrpe_theta))
        if use_output_gate:
            rank = num_heads if gate_rank is None else gate_rank
            self.gate = nn.Sequential(nn.Linear(dim, rank, bias=qkv_bias), nn.Linear(rank, dim, bias=qkv_bias))
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.tpe_direction = tpe_direction or ("causal" if self.causal else "bidirectional")
        if use_tpe:
            self.tpe = MdTpe(dim, num_heads, ndim=2, direction=self.tpe_direction, eps=norm_eps)

    def lrpe_frequencies(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``θ [H, ⌈d/2⌉]`` in ``dtype`` (the parameter when learnable, else computed now)."""
        if self.lrpe_learnable:
            return self.theta.to(dtype)
        theta = md_lrpe_theta(self.num_heads, self.head_dim, 2, self.lrpe_base, self.lrpe_theta, dtype)
        return theta.to(self.qkv.weight.device)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        if self.use_tpe:
            t = self.tpe(x, hw, num_prefix_tokens)
            if self.tpe_mode == "add":
                x_in = x + t
            else:
                x_in = torch.cat([x[:, :num_prefix_tokens], t[:, num_prefix_tokens:]], 1)
        else:
            x_in = x
        acc = accumulation_dtype(x.dtype)  # the scan's output, gate and norm: fp32 (fp64 for fp64 x)
        q, k, v = self.qkv_rows(x_in)  # projected per range of tokens (no autograd): no full-size q, k, v
        N = x.shape[1]
        angles = None
        if self.use_lrpe:
            theta = self.lrpe_frequencies(acc)
            angles = lambda a, b: md_lrpe_angles(theta, hw, num_prefix_tokens, self.head_dim, a, b)  # noqa: E731

        def queries(a: int, b: int) -> Tensor:
            qs = q(a, b)
            qs = F.silu(qs) if self.q_activation == "silu" else qs
            return qs if angles is None else md_lrpe(qs, angles(a, b))

        def keys(a: int, b: int) -> Tuple[Tensor, Optional[Tensor]]:
            ks = k(a, b)
            if angles is None:
                return ks, None
            ang = angles(a, b)
            return torch.cat([ks] * 2, -1), torch.cat([ang.cos(), ang.sin()], -1).unsqueeze(0)

        if self.causal:
            kk, k_mod = keys(0, N)
            o = additive_scan(queries(0, N), kk, v(0, N), k_mod=k_mod, causal=True, lse_init=self.lse_init,
                              out_dtype=acc, backend=self.backend)
            return map_token_chunks(lambda o, x: self.output(o.flatten(2), x), o, x)  # token-wise, cache-sized chunks
        scan = dict(num_keys=N, lse_init=self.lse_init, out_dtype=acc, backend=self.backend)
        if torch.is_grad_enabled() and x.requires_grad:
            # the epilogue reads x: split once (map_token_chunks), never a slice of x per chunk (each slice's backward
            # is a whole-size gradient of x)
            o = additive_scan_streamed(queries, keys, v, N, **scan)
            return map_token_chunks(lambda o, x: self.output(o.flatten(2), x), o, x)
        # queries and keys chunk by chunk of tokens, and gate, norm and proj as the scan's epilogue: no full-size
        # [B, N, H, 2d] features or scan output
        return additive_scan_streamed(queries, keys, v, N, output=lambda a, b, o: self.output(o.flatten(2), x[:, a:b]),
                                      **scan)

    def output(self, o: Tensor, x: Tensor) -> Tensor:
        """Gate, norm and ``proj`` of the scan output ``o (B, n, C)`` (fp32/fp64) for mixer inputs ``x (B, n, C)``."""
        if self.use_output_gate:
            g = self.gate(x).to(o.dtype)
            if self.gate_position == "pre":
                o = self.rms_norm(o * torch.sigmoid(g))
            else:
                o = self.rms_norm(o) * F.silu(g)
        else:
            o = self.rms_norm(o)
        return self.proj(o.to(x.dtype))

    def rms_norm(self, o: Tensor) -> Tensor:
        """``norm`` applied in ``o``'s dtype (fp32 or fp64), its weight cast to it."""
        return F.rms_norm(o, self.norm.normalized_shape, self.norm.weight.to(o.dtype), self.norm.eps)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, causal={self.causal}, lse_init={self.lse_init}, use_lrpe={self.use_lrpe}, "
            f"gate_position={self.gate_position!r}, use_tpe={self.use_tpe}"
        )


__all__ = [
    "LightNetAttention", "MdTpe", "decay_filter", "grid_positions", "md_lrpe", "md_lrpe_theta", "md_lrpe_angles",
]

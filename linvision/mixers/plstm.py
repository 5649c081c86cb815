"""pLSTM as a token mixer: the fused 2-D pLSTM layer of the pLSTM vision models.

Paper: Korbinian Pöppel et al., "pLSTM: parallelizable Linear Source Transition Mark networks",
arXiv 2506.11997 (2025).
Official code: ``ml-jku/plstm`` at commit ``a404ff3``, ``src/plstm/torch/plstm_2d_layer_fused.py::pLSTM2DLayerFused``
(with ``source_mark_layer.py``, ``longrange_transition_layer.py``, ``norm.py::MultiHeadRMSNorm``,
``plstm_2d_fused.py::pLSTM2D_parallel_fused_torch``), configured as in ``ml-jku/plstm_experiments`` at
``ac539b6``, ``config/model/plstm_vision.yaml``.

The layer (per head h, four orientations o = identity, flip x, flip y, flip both)::

    q, k, v  = qkv(x)                                   full dim×dim projections with bias
    S, M     = sigmoid(b + W·x_slice)                   per (head, orientation): 4H gate channels,
    T        = tanh(5·(b + W·x_slice))                  channel c = 4h + o reads x[c·w:(c+1)·w], w = dim/4H
    D        = sigmoid(b_h)                             no input dependence
    P-mode:  α = sigmoid(b_α + 0.5·W_α·x / dim);  S^r = α S,  S^d = 1 − S^r  (as coded),
             T^rl = T^ru = α T,  T^du = T^dl = 1 − α T,  M^l = M^u = M
    D-mode:  separate S^r, S^d, T^rl, T^du, T^rd, M^l, M^u; chirality "L": T^ru = T^rd, no T^dl
    y        = proj(MultiHeadRMSNorm(Σ_o pLSTM2D_o(q, k, v) + D·(q·k)·v/√Dk))

(see :func:`linvision.kernels.plstm.plstm2d` for the recurrence). Initialisation as the vision config:
S and M bias −4, D bias −6, T bias 1 (so T ≈ tanh 5 ≈ 1), all gate weights 0, the P-mode orientation
bias ``linspace(−2, 2)`` over the head axis of its ``[4, H]`` parameter, q/k/v/proj weights
``N(0, 1/(2.5·dim))`` (``SmallInit``), biases 0, RMSNorm scale 1, ``proj`` without bias.

Gate-parameter indexing follows the code, not the paper's ``b_{o,h}`` reading: the orientation
parameters have shape ``[4, H]`` (``[4, H, dim]``) and are flattened to channel ``c = i·H + j`` which the
kernel reads as head ``c // 4``, orientation ``c % 4`` (so for H ≠ 4 the linspace init does not line up
with orientations). :func:`convert_official_state_dict` maps an official ``pLSTM2DLayerFused`` state dict
onto this module.

Prefix tokens (the official 2-D model has none: its ``"cls"`` pooling would not even reach the 2-D layer
with a valid shape), ``prefix_mode``:

- ``"global"`` (default): image tokens run the 2-D scan among themselves; every prefix token reads all
  tokens with un-normalised mean linear attention ``s·q_p·(Σ_j k_j v_jᵀ)/N``, and every image token also
  reads the prefix tokens' mean state, gated per head: ``+ σ(prefix_bias_h)·s·q_i·(Σ_p k_p v_pᵀ)/P``
  (``prefix_bias`` initialised like D, −6). Global in both directions like CLEAR's rule; the per-head
  RMSNorm that follows makes the prefix tokens' output scale irrelevant.
- ``"bypass"``: prefix tokens take only their direct term ``D·s·(q_p·k_p)·v_p`` and never touch the scan;
  image outputs are then identical to a call without prefix tokens.

Deviations from the official layer:

- Scalar gates only (state-tracking dims ``J = 1``, as every shipped config), so the ``J_T > 1`` transition
  orthogonalisations (and ``matrix_eigval_limit``'s approximate backward) do not exist here.
- Any ``hw``: the official fused layer asserts a single padded chunk and crashes when the two axes round to
  different sizes (7×9) or when one axis is already a multiple of the block (16×12 pads 16 → 32). Here the
  kernel pads internally with zero gates; outputs equal the official ones wherever it runs.
- ``method="chunked"`` (linear in N) is the default (Triton forward and backward kernels for CUDA tensors
  with ``backend="auto"``); ``method="full"`` builds the official full ``N × N`` gating matrix. Both give
  the same outputs.
- q, k, v are one ``qkv`` Linear (timm names, so softmax-attention weights load); gates, states and the
  RMSNorm run in fp32 for fp16, bf16 and fp32 inputs (the scan returns fp32, so the pre-norm sum never
  rounds to the input dtype) and in fp64 for fp64 inputs (the official runs bf16 autocast).
- ``num_heads = 1`` in P-mode: the official ``LinspaceInit`` asserts a size > 1; here the bias starts at −2.
- Only the fused layer's semantics (four orientations summed, correct flips); the unfused
  ``pLSTM2DLayer``'s averaging and flip quirk are not reproduced. No convolution / passthrough options.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype, check_backend
from ..kernels.plstm import METHODS, check_chunk_size, plstm2d
from ..kernels.validation import check_choice, check_float, check_optional
from .base import QKVMixer
from .token_chunks import map_token_chunks

MODES = ("P", "D")
PREFIX_MODES = ("global", "bypass")
_P_GATES = ("source", "transition", "mark")
_D_GATES = ("source_r", "source_d", "transition_r", "transition_d", "transition_rd", "mark_l", "mark_u")


class PLSTMMixer(QKVMixer):
    """The fused 2-D pLSTM layer (P- or D-mode) as a mixer; see the module docstring."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mode: str = "P",
        qkv_bias: bool = True,
        proj_bias: bool = False,
        prefix_mode: str = "global",
        dmode_chirality: str = "L",
        source_bias_init: float = -4.0,
        mark_bias_init: float = -4.0,
        direct_bias_init: float = -6.0,
        transition_bias_init: float = 1.0,
        transition_scale: float = 5.0,
        orientation_scale: float = 0.5,
        norm_eps: float = 1e-5,
        method: str = "chunked",
        chunk_size: Optional[int] = None,
        backend: str = "auto",
    ):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.mode = check_choice("mode", mode, MODES)
        self.prefix_mode = check_choice("prefix_mode", prefix_mode, PREFIX_MODES)
        self.dmode_chirality = check_choice("dmode_chirality", dmode_chirality, ("L", "R"))
        self.method = check_choice("method", method, METHODS)
        self.chunk_size = check_optional(check_chunk_size, "chunk_size", chunk_size)
        self.backend = check_backend(backend)
        self.transition_scale = check_float("transition_scale", transition_scale)
        self.orientation_scale = check_float("orientation_scale", orientation_scale)
        self.norm_eps = check_float("norm_eps", norm_eps, min=0.0)
        inits = (("source", source_bias_init), ("mark", mark_bias_init), ("transition", transition_bias_init))
        self._inits = {kind: check_float(f"{kind}_bias_init", value) for kind, value in inits}
        self.direct_bias_init = check_float("direct_bias_init", direct_bias_init)
        if self.dim % (4 * self.num_heads):
            raise ValueError(
                f"dim={dim} must be a multiple of 4*num_heads={4 * num_heads}: each of the 4·H gate channels "
                "reads its own slice of the input (official sub_heads = 4·num_heads)"
            )
        H, channels = num_heads, 4 * num_heads
        width = dim // channels
        for name in _P_GATES if mode == "P" else _D_GATES:
            setattr(self, f"{name}_bias", nn.Parameter(torch.empty(channels)))
            setattr(self, f"{name}_weight", nn.Parameter(torch.empty(channels, width)))
        if mode == "P":
            self.orientation_bias = nn.Parameter(torch.empty(4, H))
            self.orientation_weight = nn.Parameter(torch.empty(4, H, dim))
        self.direct_bias = nn.Parameter(torch.empty(H))
        if prefix_mode == "global":
            self.prefix_bias = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.empty(H, self.head_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official vision-config initialisation (see the module docstring)."""
        std = 1.0 / math.sqrt(2.5 * self.dim)
        with torch.no_grad():
            for lin in (self.qkv, self.proj):
                nn.init.normal_(lin.weight, std=std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            for name in _P_GATES if self.mode == "P" else _D_GATES:
                kind = name.split("_")[0]
                getattr(self, f"{name}_bias").fill_(self._inits[kind])
                getattr(self, f"{name}_weight").zero_()
            if self.mode == "P":
                self.orientation_bias.copy_(torch.linspace(-2.0, 2.0, self.num_heads).expand(4, -1))
                self.orientation_weight.zero_()
            self.direct_bias.fill_(self.direct_bias_init)
            if self.prefix_mode == "global":
                self.prefix_bias.fill_(self.direct_bias_init)
            self.norm_weight.fill_(1.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode}, prefix_mode={self.prefix_mode}, method={self.method}"

    # ------------------------------------------------------------------------------------------------------

    def _pre(self, name: str, xs: Tensor) -> Tensor:
        """``b + W·x_slice`` per gate channel: xs ``(B, N, 4H, w)`` fp32 (fp64) → ``(B, N, 4H)``."""
        w, b = getattr(self, f"{name}_weight").to(xs.dtype), getattr(self, f"{name}_bias").to(xs.dtype)
        return b + torch.einsum("cd,bncd->bnc", w, xs)

    def gates(self, x: Tensor) -> Dict[str, Optional[Tensor]]:
        """All gates for image tokens ``x (B, N, C)``: ``[B, N, H, 4]`` tensors (fp32; fp64 for fp64 ``x``),
        ``d`` ``[B, N, H]``."""
        B, N, C = x.shape
        H = self.num_heads
        acc = accumulation_dtype(x.dtype)
        xf = x.to(acc)
        xs = xf.unflatten(-1, (4 * H, C // (4 * H)))

        def sig(t):  # the official exp(logsigmoid(·)), activation_scale 1
            return torch.exp(F.logsigmoid(t))

        def tr(t):
            return torch.tanh(self.transition_scale * t)

        def heads(t):
            return t.view(B, N, H, 4)

        if self.mode == "P":
            alpha = torch.sigmoid(
                self.orientation_bias.to(acc)
                + self.orientation_scale * torch.einsum("ohx,bnx->bnoh", self.orientation_weight.to(acc), xf) / self.dim
            ).reshape(B, N, 4 * H)
            s_r = alpha * sig(self._pre("source", xs))
            t_rl = alpha * tr(self._pre("transition", xs))
            m = heads(sig(self._pre("mark", xs)))
            g = dict(s_r=heads(s_r), s_d=heads(1.0 - s_r), t_rl=heads(t_rl), t_du=heads(1.0 - t_rl),
                     t_dl=heads(1.0 - t_rl), t_ru=heads(t_rl), m_l=m, m_u=m)
        else:
            t_rd = heads(tr(self._pre("transition_rd", xs)))
            g = dict(
                s_r=heads(sig(self._pre("source_r", xs))), s_d=heads(sig(self._pre("source_d", xs))),
                t_rl=heads(tr(self._pre("transition_r", xs))), t_du=heads(tr(self._pre("transition_d", xs))),
                t_dl=None if self.dmode_chirality == "L" else t_rd,
                t_ru=None if self.dmode_chirality == "R" else t_rd,
                m_l=heads(sig(self._pre("mark_l", xs))), m_u=heads(sig(self._pre("mark_u", xs))),
            )
        g["d"] = sig(self.direct_bias.to(acc)).expand(B, N, H)
        return g

    def scan(self, q: Tensor, k: Tensor, v: Tensor, x: Tensor, hw: Tuple[int, int]) -> Tensor:
        """pLSTM over the image tokens: q, k, v ``(B, N, H, D)``, gates from ``x (B, N, C)`` → ``(B, N, H, D)``
        in fp32 (fp64 for fp64 inputs): the norm that follows sees the unrounded sum."""
        g = self.gates(x)
        return plstm2d(
            q, k, v, g["s_r"], g["s_d"], g["t_rl"], g["t_du"], g["t_dl"], g["t_ru"], g["m_l"], g["m_u"], g["d"],
            hw=hw, method=self.method, chunk_size=self.chunk_size, out_dtype=accumulation_dtype(q.dtype),
            backend=self.backend,
        )

    def _norm(self, o: Tensor) -> Tensor:
        """MultiHeadRMSNorm: per head over Dv, in ``o``'s dtype (fp32 or fp64), scale ``norm_weight [H, Dv]``."""
        return o * torch.rsqrt(o.square().mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight.to(o.dtype)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        P = num_prefix_tokens
        q, k, v = self.project_qkv(x)  # (B, N, H, D) views
        scale = self.head_dim ** -0.5
        img = self.scan(q[:, P:], k[:, P:], v[:, P:], x[:, P:], hw)  # fp32 (fp64)
        if P:
            qf, kf, vf = q.to(img.dtype), k.to(img.dtype), v.to(img.dtype)
            if self.prefix_mode == "bypass":
                d = torch.exp(F.logsigmoid(self.direct_bias.to(img.dtype)))
                pre = d[:, None] * scale * (qf[:, :P] * kf[:, :P]).sum(-1, keepdim=True) * vf[:, :P]
            else:
                state_all = torch.einsum("bnhd,bnhe->bhde", kf, vf) / x.shape[1]
                pre = scale * torch.einsum("bnhd,bhde->bnhe", qf[:, :P], state_all)
                state_pre = torch.einsum("bnhd,bnhe->bhde", kf[:, :P], vf[:, :P]) / P
                gate = torch.sigmoid(self.prefix_bias.to(img.dtype))[:, None]
                img = img + scale * gate * torch.einsum("bnhd,bhde->bnhe", qf[:, P:], state_pre)
            o = torch.cat([pre, img], dim=1)
        else:
            o = img
        return map_token_chunks(lambda o: self.proj(self._norm(o).to(x.dtype).flatten(2)), o)  # cache-sized temporaries


def convert_official_state_dict(sd: Dict[str, Tensor], mode: str = "P") -> Dict[str, Tensor]:
    """Map a ``pLSTM2DLayerFused`` state dict (J = 1, vision config: q/k/v ``sub_heads = 1``, gates
    ``sub_heads = 4·num_heads``) onto :class:`PLSTMMixer` names. ``prefix_bias`` is not in it (strict=False)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    H, DK = sd["query.bias"].shape[:2]
    dim = sd["outprojection.weight"].shape[0]
    out: Dict[str, Tensor] = {}

    def proj_w(name):
        w = sd[f"{name}.weight"]
        if w.shape[0] != H or w.shape[3] != 1:
            raise ValueError(f"{name}.weight {tuple(w.shape)}: only sub_heads = 1 q/k/v projections convert")
        return w.reshape(H * w.shape[1], dim)

    out["qkv.weight"] = torch.cat([proj_w(n) for n in ("query", "key", "value_")], dim=0)
    out["qkv.bias"] = torch.cat([sd[f"{n}.bias"].reshape(-1) for n in ("query", "key", "value_")], dim=0)
    out["proj.weight"] = sd["outprojection.weight"]
    if "outprojection.bias" in sd:
        out["proj.bias"] = sd["outprojection.bias"]
    out["norm_weight"] = sd["mhnorm.scale"]
    out["direct_bias"] = sd["direct.bias"].reshape(H)
    C = 4 * H

    def gate(src, dst, transition=False):
        if transition:
            b, w = sd[f"{src}.eigenvalues_bias"], sd[f"{src}.eigenvalues_weight"]
        else:
            b, w = sd[f"{src}.bias"], sd[f"{src}.weight"]
        if b.numel() != C or w.shape[0] != 1 or w.shape[1] != C:
            raise ValueError(f"{src}: expected J = 1 gates with sub_heads = 4·num_heads, got {tuple(w.shape)}")
        out[f"{dst}_bias"] = b.reshape(C)
        out[f"{dst}_weight"] = w.reshape(C, -1)

    if mode == "P":
        out["orientation_bias"] = sd["orientation_bias"]
        out["orientation_weight"] = sd["orientation_weight"]
        gate("source", "source")
        gate("transition", "transition", transition=True)
        gate("mark", "mark")
    else:
        for name in ("source_r", "source_d", "mark_l", "mark_u"):
            gate(name, name)
        for name in ("transition_r", "transition_d", "transition_rd"):
            gate(name, name, transition=True)
    return out

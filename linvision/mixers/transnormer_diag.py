"""TransNormer's DiagAttention on 2-D blocks of the image: attention only within non-overlapping tiles.

Paper: Qin et al., "The Devil in Linear Transformer" (EMNLP 2022, arXiv 2210.10340), DiagAttention, used in
the first half of the layers. Official code read at ``OpenNLPLab/fairseq-evo @38fa81f233c4e5b4376fb52d86eaa1a80d42bf6a``:
``fairseq/modules/x_attention/norm_local_attention.py::NormLocalAttention.forward_chunk`` (``group_type="chunk"``,
non-causal) and the paper's configs ``roberta_x_attention/norm_attention.py::roberta_transnormer_t1/t2``:
``encoder_chunk_size=64``, ``local_act_fun="relu"``, ``local_norm_type="simplermsnorm"``, and for T2
``use_softmax=True``.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels.backend import accumulation_dtype
from ..kernels.validation import check_bool, check_choice, check_int
from .base import TokenMixer
from .grid_blocks import block_local, block_rectangles
from .token_chunks import chunk_tokens
from .transnormer_norms import NORM_TYPES, build_norm, has_parameters

LOCAL_ACT_FUNS = ("relu",)


def _block_attention(q: Tensor, k: Tensor, v: Tensor, use_softmax: bool) -> Tensor:
    """``(S, H, L, D)`` blocks → ``(S, H, L, Dv)``: ``softmax(q·kᵀ/√D) v`` or ``relu(q·kᵀ/√D) v`` (in the
    dtype of the inputs: the caller passes fp32 or fp64 for the unbounded ReLU sums)."""
    if use_softmax:
        return F.scaled_dot_product_attention(q, k, v)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(F.relu(scores), v)


class DiagAttention(TokenMixer):
    """Block-diagonal attention on the token grid: each image token attends to the tokens of its ``bh×bw`` tile.

    Shapes: ``x (B, N, C)`` with ``N = T + h·w`` (``T = num_prefix_tokens`` prefix tokens first, image
    tokens in raster order) → ``y (B, N, C)``; ``H`` heads of ``D = C/H`` channels. Per head and tile,
    with the official ``q·D^-½`` scaling:

    - ``use_softmax=True`` (default; TransNormer T2): ``O = softmax(Q Kᵀ/√D) V``, no norm afterwards
      (as the official ``forward_chunk``: the norm is skipped under softmax);
    - ``use_softmax=False`` (T1): ``O = ReLU(Q Kᵀ/√D) V`` (``act_fun``), then ``norm`` over all ``C`` channels.

    Then ``out_proj``. Blocks: the official 1-D chunks of ``encoder_chunk_size = 64`` consecutive tokens
    (the module's own default, 32, is overridden by every TransNormer config) become ``block_size = (8, 8)``
    tiles of the image: the same 64 tokens per block, local in both directions. ``block_size`` is an int
    (square tiles) or ``(bh, bw)``. With ``block_size = (r, w)`` on a grid of width ``w`` each tile is ``r``
    whole rows, i.e. exactly the official 1-D chunks of ``r·w`` raster tokens.

    Grids not divisible by the block: the last tile row/column is smaller and holds only real tokens
    (the official code zero-pads the last chunk, and under softmax the padded zero keys take part in
    the softmax; here nothing is padded). Prefix tokens (the official 1-D code has none) attend to every
    token, prefix and image (a class token can summarise the image even in a model of DiagAttention
    layers only), while image tokens attend within their tile only, prefix keys excluded. The
    tiles are reshaped into a batch of ``L = bh·bw``-token sequences (:func:`linvision.mixers.grid_blocks.block_local`)
    and go through PyTorch SDPA (softmax) or two small matmuls in fp32 (ReLU): no ``N×N`` mask.

    Options (official names where they exist): ``block_size``; ``use_softmax``; ``act_fun`` (``"relu"``,
    the ReLU branch's map); ``norm_type`` (``"simplermsnorm"``, default as in T1/T2; ``"rmsnorm"``,
    ``"gatedrmsnorm"`` (the module's own default), ``"layernorm"``); ``bias`` (projection biases, True).
    A norm with parameters together with ``use_softmax=True`` is refused: the official module would build
    it and never use it.

    Parameters as the official module (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``, ``norm``), so its
    state dict loads with ``strict=True``; init as its ``reset_parameters`` (Xavier-uniform weights,
    ``out_proj`` bias zero; same creation order, so the same seed gives the official initial weights).
    Not built: URPE (a 1-D position encoding, on in the paper's T1/T2 models), ``weight_type``
    re-weightings, dropout on the probabilities, causal masking.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        block_size: Union[int, Sequence[int]] = 8,
        use_softmax: bool = True,
        act_fun: str = "relu",
        norm_type: str = "simplermsnorm",
        bias: bool = True,
    ):
        super().__init__(dim, num_heads)
        self.block_size = _block_hw(block_size)
        self.use_softmax = check_bool("use_softmax", use_softmax)
        self.act_fun = check_choice("act_fun", act_fun, LOCAL_ACT_FUNS)
        self.norm_type = check_choice("norm_type", norm_type, NORM_TYPES)
        bias = check_bool("bias", bias)
        if use_softmax and has_parameters(norm_type):
            raise ValueError(
                f"norm_type={norm_type!r} has parameters, but with use_softmax=True the norm is not applied; "
                "use norm_type='simplermsnorm' or use_softmax=False"
            )
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.norm = build_norm(norm_type, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official ``reset_parameters``."""
        for proj in (self.k_proj, self.v_proj, self.q_proj, self.out_proj):
            nn.init.xavier_uniform_(proj.weight)
        if self.out_proj.bias is not None:
            nn.init.constant_(self.out_proj.bias, 0.0)

    def mix(self, x: Tensor, hw: Tuple[int, int], num_prefix_tokens: int) -> Tensor:
        T, (h, w) = num_prefix_tokens, hw
        B, N, C = x.shape
        acc = accumulation_dtype(x.dtype)

        def project(t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:  # (B, n, C) → q, k, v [B, n, H, D]
            q, k, v = (self.split_heads(p(t)) for p in (self.q_proj, self.k_proj, self.v_proj))
            if not self.use_softmax:  # unbounded ReLU sums: fp32 (fp64 for fp64) up to and through the norm
                q, k, v = (t.to(acc) for t in (q, k, v))
            return q, k, v

        def output(o: Tensor) -> Tensor:  # [B, n, H, D] → (B, n, C)
            o = o.flatten(2)
            return self.out_proj((o if self.use_softmax else self.norm(o)).to(x.dtype))

        attend = lambda a, b, c: _block_attention(a, b, c, self.use_softmax)  # noqa: E731
        full = project(x) if T else None  # prefix queries see every key
        out = x.new_empty(B, N, C)
        if T:
            q, k, v = (t.transpose(1, 2) for t in full)
            out[:, :T] = output(attend(q[:, :, :T], k, v).transpose(1, 2))
        # Image tokens in rectangles of whole blocks (tiles never cross one): every temporary is rectangle-sized.
        image = lambda t: t[:, T:].unflatten(1, (h, w))  # noqa: E731  (B, h, w, ...) view of the image tokens
        for r0, r1, c0, c1 in block_rectangles(hw, self.block_size, chunk_tokens(B, C)):
            part = lambda t: image(t)[:, r0:r1, c0:c1].flatten(1, 2)  # noqa: E731  a copy unless whole rows
            q, k, v = project(part(x)) if full is None else (part(t) for t in full)
            y = output(block_local(q, k, v, (r1 - r0, c1 - c0), self.block_size, attend))
            image(out)[:, r0:r1, c0:c1] = y.unflatten(1, (r1 - r0, c1 - c0))
        return out

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, block_size={self.block_size}, use_softmax={self.use_softmax}, "
                f"norm_type={self.norm_type!r}")


def _block_hw(block_size) -> Tuple[int, int]:
    """``block_size`` as ``(bh, bw)`` of positive ints (an int ``b`` means ``b×b``)."""
    if isinstance(block_size, Sequence) and not isinstance(block_size, str):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a pair (bh, bw), got {block_size!r}")
        return check_int("block_size[0]", block_size[0], min=1), check_int("block_size[1]", block_size[1], min=1)
    b = check_int("block_size", block_size, min=1)
    return b, b


__all__ = ["DiagAttention", "LOCAL_ACT_FUNS"]

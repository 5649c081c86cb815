"""linvision.kernels: the kernel layer, one folder per operation (PyTorch reference beside Triton kernel).

Needs only torch (and triton for the GPU path). Layout everywhere is ``[B, N, H, D]``. Shared by the ops:
``backend`` (choosing the PyTorch or Triton path), ``validation`` (input checks), ``triton_support`` (host-side
Triton helpers: block sizes, split plans, SM count, ``tl.dot`` precision) and ``triton_device`` (``@triton.jit``
helpers inlined into the kernels).

The public ops are functions of this package (``from linvision.kernels import linear_attention``); each lives
in a folder whose name differs from the function's, so a submodule never shadows an op:

- ``linvision.kernels.linear_attn.linear_attention``: bidirectional linear attention.
- ``linvision.kernels.window_attn.window_attention``: circular-window softmax attention on a 2-D grid with
  global prefix tokens and pooled tokens (CLEAR).
- ``linvision.kernels.additive_recurrence.additive_scan``: LightNet's additive (log-sum-exp normalised) recurrence,
  non-causal (one key-softmax over all tokens) or causal (raster-order prefix softmax).
- ``linvision.kernels.infsa``: pure InfSA (``pure_infsa``) and Linear-InfSA (``linear_infsa``, ``linear_infsa_pooled``).
- ``linvision.kernels.gated_recurrence.gated_scan``: gated / delta-rule linear recurrences (GLA, DeltaNet, Gated
  DeltaNet, KDA) along a token order, forward, backward or bidirectional.
- ``linvision.kernels.plstm.plstm2d``: pLSTM source/transition/mark state passing over a 2-D grid (naive,
  log-doubling full G, chunked; Triton forward + backward), plus ``plstm1d`` and ``plstm_dag``.
"""

from .additive_recurrence import additive_scan
from .gated_recurrence import gated_scan
from .infsa import linear_infsa, linear_infsa_pooled, pure_infsa
from .linear_attn import linear_attention
from .plstm import plstm1d, plstm2d, plstm_dag
from .window_attn import window_attention

__all__ = [
    "additive_scan",
    "gated_scan",
    "linear_attention",
    "linear_infsa",
    "linear_infsa_pooled",
    "plstm1d",
    "plstm2d",
    "plstm_dag",
    "pure_infsa",
    "window_attention",
]

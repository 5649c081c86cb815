"""Attention transfer: train a linear mixer's new parameters to reproduce the softmax attention it replaced.

Two per-layer losses, as in the linearization papers:

- on attention **weights** (Hedgehog, arXiv 2402.04347; LoLCATs' ``xent`` term): the cross-entropy between
  the softmax weights ``softmax(q kᵀ/√D)`` and the mixer's normalised weights (``mixer.attention_rows``),
  ``−Σ_j t_ij log a_ij`` averaged over batch, heads and queries, with LoLCATs' ``log(clamp(a, 1e-12))``
  fed to a soft-target cross-entropy (HazyResearch/lolcats ``src/trainer/distill_attention_xent_mse.py``).
  It is computed in chunks of query rows, each under activation checkpointing, so the forward *and* the
  backward hold one ``[B, H, chunk, N]`` block at a time: memory linear in ``N``.
- on attention **outputs** (LoLCATs' ``mse`` term, factor 1000 in its configs): the MSE between the mixer's
  output and the softmax attention's. Deviation: LoLCATs compares head outputs before ``o_proj``; here the
  mixer's output after ``proj`` (the same frozen linear map for both in stage 1), so any mixer works.

>>> transfer = AttentionTransfer(model)              # hooks on every mixer with attention_rows()
>>> names = select_new_parameters(model)             # stage 1: only feature maps / window factors train
>>> model(images); transfer.loss(weights=1.0, outputs=1000.0)["loss"].backward()
>>> transfer.remove()

Each hook returns the **softmax** output (teacher forcing, as LoLCATs' ``train_attention`` mode), so every
layer learns from the teacher's own activations in one forward pass of the student.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..kernels.validation import check_bool, check_float, check_int

LOG_CLAMP = 1e-12  # LoLCATs: a_pred.clamp(min=1e-12).log()
Rows = Callable[[int, int], Tensor]


def softmax_rows(q: Tensor, k: Tensor, start: int, stop: int) -> Tensor:
    """Softmax attention weights of query rows ``start:stop``: ``[B, H, n, N]`` (fp32; fp64 for fp64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.einsum("bnhd,bmhd->bhnm", q[:, start:stop].to(acc), k.to(acc)) / math.sqrt(q.shape[-1])
    return s.softmax(-1)


def _chunk_ce(q: Tensor, k: Tensor, rows: Rows, start: int, stop: int) -> Tensor:
    target = softmax_rows(q, k, start, stop)
    pred = rows(start, stop).to(target.dtype)
    return -(target * pred.clamp(min=LOG_CLAMP).log().log_softmax(-1)).sum()


def attention_weight_ce(q: Tensor, k: Tensor, rows: Rows, chunk: int = 64) -> Tensor:
    """Mean over ``B·H·N`` query rows of the cross-entropy from softmax weights to ``rows`` weights.

    ``q, k [B, N, H, D]``: the softmax attention's queries and keys (targets: no gradient flows to them).
    ``rows(a, b)``: the student's normalised weights of query rows ``a:b``, ``[B, H, b − a, N]``.
    ``chunk`` query rows at a time, each recomputed in the backward (checkpointing): peak memory
    ``O(B·H·chunk·N)`` beyond the inputs, never ``N × N``.
    """
    chunk = check_int("chunk", chunk, min=1)
    B, N, H, _ = q.shape
    q, k = q.detach(), k.detach()
    total = None
    for a in range(0, N, chunk):
        b = min(N, a + chunk)
        part = checkpoint(_chunk_ce, q, k, rows, a, b, use_reentrant=False)
        total = part if total is None else total + part
    return total / (B * H * N)


def teacher_attention(mixer: nn.Module, x: Tensor, rope=None, num_prefix_tokens: int = 0) -> Tensor:
    """The softmax attention that ``mixer`` replaced, from its own (inherited) ``qkv``/``proj`` (and q/k norms):
    ``(B, N, C)``; with ``rope`` (a :class:`linvision.mixers.rotary.Rotation`) q and k of the image tokens
    rotated, as the teacher's."""
    q, k, v = mixer.project_qkv(x)
    if rope is not None:
        q, k = rope.apply(q, num_prefix_tokens), rope.apply(k, num_prefix_tokens)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return mixer.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def _call_args(args: tuple, kwargs: dict) -> Tuple[Tensor, Tuple[int, int], int]:
    """``(x, hw, num_prefix_tokens)`` of a mixer call ``mixer(x, hw, num_prefix_tokens=0)``."""
    x = args[0] if args else kwargs["x"]
    hw = args[1] if len(args) > 1 else kwargs["hw"]
    prefix = args[2] if len(args) > 2 else kwargs.get("num_prefix_tokens", 0)
    return x, hw, int(prefix)


def transfer_mixers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, mixer)`` of every module of ``model`` with ``attention_rows`` (hedgehog, lolcats, liger)."""
    return [(n, m) for n, m in model.named_modules() if callable(getattr(m, "attention_rows", None))]


class AttentionTransfer:
    """Forward hooks on every transferable mixer of ``model`` (module names and state-dict keys unchanged).

    On each mixer call the hook computes the softmax teacher from the mixer's own ``qkv``/``proj``, stores
    the layer's losses (``weights``: :func:`attention_weight_ce`, ``outputs``: MSE) and, with
    ``teacher_forcing``, returns the teacher's output in place of the mixer's. ``enabled = False`` pauses it. :meth:`loss` combines them;
    :meth:`remove` detaches the hooks. ``ValueError`` when the model has no such mixer or both losses are off.
    """

    def __init__(self, model: nn.Module, weights: bool = True, outputs: bool = True, chunk: int = 64,
                 teacher_forcing: bool = True):
        self.weights = check_bool("weights", weights)
        self.outputs = check_bool("outputs", outputs)
        self.chunk = check_int("chunk", chunk, min=1)
        self.teacher_forcing = check_bool("teacher_forcing", teacher_forcing)
        if not (weights or outputs):
            raise ValueError("attention transfer needs the weight loss, the output loss or both")
        self.layers = transfer_mixers(model)
        if not self.layers:
            raise ValueError("the model has no mixer with attention_rows() (hedgehog, lolcats, liger): "
                             "nothing to transfer")
        self.losses: Dict[str, Dict[str, Tensor]] = {}
        self.enabled = True  # False: the mixers run as they are (e.g. to evaluate the student)
        self.handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.layers]

    def _hook(self, name: str):
        def hook(mixer: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Optional[Tensor]:
            if not self.enabled:
                return None
            x, hw, prefix = _call_args(args, kwargs)
            rope = getattr(mixer, "current_rope", None)  # the RoPE of this call (EVA02 / RoPE ViT teachers)
            with torch.no_grad():
                teacher = teacher_attention(mixer, x, rope, prefix)
            terms = {}
            if self.weights:
                q, k, rows = mixer.attention_rows(x, hw, prefix, **({} if rope is None else {"rope": rope}))
                terms["weights"] = attention_weight_ce(q, k, rows, self.chunk)
            if self.outputs:
                terms["outputs"] = F.mse_loss(output.float(), teacher.float())
            self.losses[name] = terms
            return teacher.to(output.dtype) if self.teacher_forcing else output

        return hook

    def clear(self) -> None:
        self.losses = {}

    def loss(self, weights: float = 1.0, outputs: float = 1000.0) -> Dict[str, Tensor]:
        """``{"loss", "weights", "outputs"}`` of the last forward: each term the mean over layers, ``loss``
        their weighted sum (the LoLCATs trainer's ``xent_factor``, ``mse_factor``)."""
        weights = check_float("weights", weights, min=0.0)
        outputs = check_float("outputs", outputs, min=0.0)
        if not self.losses:
            raise ValueError("no transfer losses: run a forward pass of the model first")
        terms: Dict[str, Tensor] = {}
        for key in ("weights", "outputs"):
            parts = [t[key] for t in self.losses.values() if key in t]
            if parts:
                terms[key] = torch.stack(parts).mean()
        terms["loss"] = sum(f * terms[k] for k, f in (("weights", weights), ("outputs", outputs)) if k in terms)
        return terms

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.losses = {}


INHERITED = ("qkv.", "proj.")


def new_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters the linear mixers add to the softmax attention (feature maps, window
    factors): every parameter of a mixer with ``attention_rows`` except its ``qkv``/``proj``."""
    return [f"{prefix}.{n}" for prefix, mixer in transfer_mixers(model)
            for n, _ in mixer.named_parameters() if not n.startswith(INHERITED)]


def select_new_parameters(model: nn.Module, extra: Optional[List[str]] = None) -> List[str]:
    """Stage 1: ``requires_grad`` only on :func:`new_parameter_names` (plus ``extra`` names); returns them.

    ``ValueError`` when the mixers add no parameter (Liger: nothing to train in stage 1)."""
    names = set(new_parameter_names(model)) | set(extra or ())
    if not names:
        raise ValueError("the linear mixers add no parameters (e.g. liger): stage 1 has nothing to train")
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    return [n for n, _ in model.named_parameters() if n in names]


__all__ = ["AttentionTransfer", "LOG_CLAMP", "attention_weight_ce", "new_parameter_names", "select_new_parameters",
           "softmax_rows", "teacher_attention", "transfer_mixers"]

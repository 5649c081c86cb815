"""Stage 2 of linearization with LoRA (peft): low-rank updates of the attention projections, merged at export.

LoLCATs' recipe (arXiv 2410.10254, ``configs/experiment/*``): rank 8, alpha 16, no dropout, on the q/k/v/o
projections. Here the targets are the fused ``qkv`` and ``proj`` of every block's mixer (``blocks.<i>.attn.qkv``
in linvit, ``blocks.<i>.attn.mixer.qkv`` in a ``linvision.timm.linearize``-d timm ViT).
"""
from __future__ import annotations

from typing import List, Sequence

from torch import nn

from ..kernels.validation import check_float, check_int


def lora_target_pattern(targets: Sequence[str]) -> str:
    """The peft ``target_modules`` regex for the given linear names inside each block's attention."""
    if not targets or not all(isinstance(t, str) and t.isidentifier() for t in targets):
        raise ValueError(f"LoRA targets must be module names such as ['qkv', 'proj'], got {targets!r}")
    return r".*blocks\.\d+\.attn\.(.*\.)?(" + "|".join(targets) + ")"


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets: Sequence[str] = ("qkv", "proj"),
             dropout: float = 0.0) -> List[str]:
    """Inject LoRA adapters (peft) into ``model`` in place; only they train afterwards. Returns their names.

    ``ValueError`` when no module matches ``targets``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    rank = check_int("lora rank", rank, min=1)
    alpha = check_float("lora alpha", alpha, min=0.0, min_open=True)
    dropout = check_float("lora dropout", dropout, min=0.0, max=1.0, max_open=True)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_pattern(targets))
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:
        raise ValueError(f"LoRA targets {list(targets)} match no module of the model: {err}") from None
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and put the plain layer back (state-dict keys as before)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.get_base_layer())
    return model


__all__ = ["add_lora", "lora_target_pattern", "merge_lora"]

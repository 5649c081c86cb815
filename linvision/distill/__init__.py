"""Distillation of a softmax diffusion denoiser into a linvision adapter (LinFusion, CLEAR, LiT recipes).

- :mod:`.pair`: teacher (frozen copy) and student (the pipeline's denoiser + adapter) with feature hooks,
  and the choice of trainable parameters by name pattern.
- :mod:`.hooks`: forward hooks capturing per-layer attention outputs; layer names checked.
- :mod:`.loss`: task + output matching + per-layer attention-output matching (+ LiT's variance term).
- :mod:`.objective`: ε / v / x₀ / flow-matching noising and targets from the scheduler config.
- :mod:`.conditioning`: how each family (UNet, DiT, PixArt, SANA, SD3, FLUX, LinVisionDiT) is conditioned and called.
- :mod:`.transfer`: attention transfer (Hedgehog's weight cross-entropy in query chunks, LoLCATs' output MSE)
  and the stage-1 choice of the mixers' new parameters; :mod:`.lora`: stage-2 LoRA (peft) and its merge.

The job around it (data, accelerate loop, checkpoints, sample grids) is ``linvision distill``
(:mod:`linvision.train.distill`).
"""
from .conditioning import Conditioner, conditioner_for
from .hooks import FeatureHooks, resolve_layers
from .loss import CLEAR, LINFUSION, LIT, LossWeights, distill_loss
from .objective import Objective
from .pair import DistillPair, select_trainable
from .transfer import AttentionTransfer, attention_weight_ce, new_parameter_names, select_new_parameters

__all__ = ["AttentionTransfer", "CLEAR", "Conditioner", "DistillPair", "FeatureHooks", "LINFUSION", "LIT", "LossWeights",
           "Objective", "attention_weight_ce", "conditioner_for", "distill_loss", "new_parameter_names",
           "resolve_layers", "select_new_parameters", "select_trainable"]

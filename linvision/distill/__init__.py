"""Distillation of a softmax diffusion denoiser into a linvision adapter (LinFusion, CLEAR, LiT recipes).

- :mod:`.pair`: teacher (frozen copy) and student (the pipeline's denoiser + adapter) with feature hooks,
  and the choice of trainable parameters by name pattern.
- :mod:`.hooks`: forward hooks capturing per-layer attention outputs; layer names checked.
- :mod:`.loss`: task + output matching + per-layer attention-output matching (+ LiT's variance term).
- :mod:`.objective`: ε / v / x₀ / flow-matching noising and targets from the scheduler config.
- :mod:`.conditioning`: how each family (UNet, DiT, PixArt, SD3, FLUX) is conditioned and called.

The job around it (data, accelerate loop, checkpoints, sample grids) is ``linvision distill``
(:mod:`linvision.train.distill`).
"""
from .conditioning import Conditioner, conditioner_for
from .hooks import FeatureHooks, resolve_layers
from .loss import CLEAR, LINFUSION, LIT, LossWeights, distill_loss
from .objective import Objective
from .pair import DistillPair, select_trainable

__all__ = ["CLEAR", "Conditioner", "DistillPair", "FeatureHooks", "LINFUSION", "LIT", "LossWeights", "Objective",
           "conditioner_for", "distill_loss", "resolve_layers", "select_trainable"]

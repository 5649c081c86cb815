"""The task loss's noising and regression target, read from a pipeline's scheduler config.

| scheduler                               | ``kind``        | noisy input ``x_t``                | target                       |
|-----------------------------------------|-----------------|------------------------------------|------------------------------|
| DDPM family, ``prediction_type=epsilon`` | ``epsilon``     | ``√ᾱ_t x₀ + √(1−ᾱ_t) ε``            | ``ε``                        |
| DDPM family, ``v_prediction`` (SD 2.1)   | ``v_prediction``| same                               | ``√ᾱ_t ε − √(1−ᾱ_t) x₀``      |
| DDPM family, ``sample``                  | ``sample``      | same                               | ``x₀``                       |
| ``FlowMatchEulerDiscreteScheduler``      | ``flow``        | ``(1−σ) x₀ + σ ε``                  | ``ε − x₀`` (SD3/FLUX/CLEAR)  |
| ``prediction_type=flow_prediction`` (SANA's DPM-Solver) | ``flow`` | same                         | ``ε − x₀`` (SANA)            |

Timesteps are uniform over the ``num_train_timesteps`` training steps (LinFusion: DDPM's 1000; CLEAR:
``compute_density_for_timestep_sampling('none')``, a uniform index into the flow scheduler's training
sigmas; SANA's flow DPM-Solver: the same table with ``shift = flow_shift``). ``ᾱ`` comes from ``DDPMScheduler.from_config(config)`` (what LinFusion trains with), the flow
sigmas from a fresh scheduler built from the config, so sampling with the pipeline's own scheduler
(which ``set_timesteps`` changes) never moves them. Everything is computed in fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

KINDS = ("epsilon", "v_prediction", "sample", "flow")


def _expand(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` → ``(B, 1, …, 1)`` broadcastable against ``like``."""
    return values.reshape(-1, *([1] * (like.dim() - 1)))


class Objective:
    """Noising, target and timestep sampling of the task loss for one scheduler config.

    ``scheduler``: the pipeline's scheduler (only its class and config are read). ``kind`` is chosen
    from it (see the module table); ``ValueError`` for an unknown ``prediction_type``.
    """

    def __init__(self, scheduler):
        from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

        config = scheduler.config
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        flow_match = isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or "FlowMatch" in type(scheduler).__name__
        if flow_match or config.get("prediction_type") == "flow_prediction":
            self.kind = "flow"
            fresh = (FlowMatchEulerDiscreteScheduler.from_config(config) if flow_match else
                     FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps,
                                                     shift=float(config.get("flow_shift") or 1.0)))
            self.sigmas = fresh.sigmas[: self.num_train_timesteps].to(torch.float32).clone()  # (T,), descending
            self.timesteps = fresh.timesteps[: self.num_train_timesteps].to(torch.float32).clone()  # σ·T
            self.alphas_cumprod = None
        else:
            self.kind = str(config.get("prediction_type", "epsilon"))
            if self.kind not in KINDS[:3]:
                raise ValueError(f"unsupported prediction_type {self.kind!r}; expected one of {KINDS[:3]}")
            ddpm = DDPMScheduler.from_config(config)
            self.alphas_cumprod = ddpm.alphas_cumprod.to(torch.float32).clone()  # (T,)
            self.sigmas = self.timesteps = None
        self.num_train_timesteps = min(self.num_train_timesteps, self._table_len())

    def _table_len(self) -> int:
        return len(self.sigmas) if self.kind == "flow" else len(self.alphas_cumprod)

    def sample_indices(self, batch: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``(batch,)`` int64 indices into the training schedule, uniform (CPU ``generator``)."""
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator)

    def model_timestep(self, index: Tensor) -> Tensor:
        """The ``timestep`` the denoiser is called with: the index (DDPM) or ``σ·T`` (flow, as the pipelines
        pass it; FLUX's own /1000 happens in the call, see :mod:`linvision.distill.conditioning`)."""
        if self.kind == "flow":
            return self.timesteps[index.cpu()].to(index.device)
        return index

    def _coefficients(self, index: Tensor, like: Tensor):
        i = index.cpu()
        if self.kind == "flow":
            sigma = _expand(self.sigmas[i], like).to(like.device)
            return 1.0 - sigma, sigma
        ac = self.alphas_cumprod[i]
        return _expand(ac.sqrt(), like).to(like.device), _expand((1 - ac).sqrt(), like).to(like.device)

    def add_noise(self, x0: Tensor, noise: Tensor, index: Tensor) -> Tensor:
        """``x_t`` for clean latents ``x0 (B, …)``, ``noise`` like it, schedule ``index (B,)``; fp32."""
        a, b = self._coefficients(index, x0)
        return a * x0.float() + b * noise.float()

    def target(self, x0: Tensor, noise: Tensor, index: Tensor) -> Tensor:
        """The regression target of the task loss (module table); fp32, shaped like ``x0``."""
        if self.kind == "epsilon":
            return noise.float()
        if self.kind == "sample":
            return x0.float()
        if self.kind == "flow":
            return noise.float() - x0.float()
        a, b = self._coefficients(index, x0)
        return a * noise.float() - b * x0.float()

    def __repr__(self) -> str:
        return f"Objective(kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps})"


__all__ = ["KINDS", "Objective"]

"""Conditional latent sampling: CXR latent in, soft-tissue latent out (one path, docs/method.md §4).

The UNet, the noise schedule and the sampler stay separate: :func:`make_denoiser`
builds the ``denoise_fn`` the samplers call, putting the condition into the network input the way
the model was trained (``diffusion.cond_mode``, §3.5) and keeping only the 4 supervised output
channels (§7.4). :func:`suppress_latents` runs the configured sampler with temporal adaptive
thresholding r_j = r0 + κ·j. A run's timestep grid is computed once
(:func:`models.samplers.sampler_grid`) and passed to the clip ranges
(:func:`models.samplers.tat_ranges`) and to the loop (:func:`models.samplers.sample`).
"""
from __future__ import annotations

from typing import Callable

import torch

from models.samplers import sample, sampler_grid, tat_ranges
from models.schedule import NoiseSchedule, model_input_sample

LATENT_CHANNELS = 4


def make_denoiser(unet: torch.nn.Module, schedule: NoiseSchedule, cond: torch.Tensor,
                  cond_mode: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``denoise_fn(x_t (B, 4, h, w), t (B,)) -> eps (B, 4, h, w)`` conditioned on ``cond`` (B, 4, h, w)."""

    def denoise_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(model_input_sample(x_t, cond, t, schedule, cond_mode), t)
        return out[:, :LATENT_CHANNELS].float()

    return denoise_fn


@torch.no_grad()
def suppress_latents(unet: torch.nn.Module, schedule: NoiseSchedule, cond: torch.Tensor, sampler_cfg,
                     cond_mode: str, generator: torch.Generator | list[torch.Generator] | None = None,
                     r0: float | None = None, progress: bool = False, callback=None) -> torch.Tensor:
    """Sample soft-tissue latents for a batch of CXR latents ``cond`` (B, 4, h, w) (global path).

    Args:
        sampler_cfg: :class:`utils.config.SamplerConfig` (name, steps, eta, clip settings).
        r0: first clip range (default ``sampler_cfg.clip_r0_global``).
        generator: seeds x_T and every step's noise, so a seed gives the same sample; a list of B
            generators makes each element's sample independent of the rest of the batch.
        callback: passed to :func:`models.samplers.sample` (``callback(j, t, step_output)``).

    Returns:
        (B, 4, h, w) float32 latents.
    """
    r0 = sampler_cfg.clip_r0_global if r0 is None else r0
    timesteps = sampler_grid(sampler_cfg, schedule)
    ranges = tat_ranges(sampler_cfg, r0, schedule.num_train_timesteps, timesteps=timesteps)
    return sample(make_denoiser(unet, schedule, cond, cond_mode), schedule, tuple(cond.shape),
                  sampler_name=sampler_cfg.name, clip_ranges=ranges, generator=generator, eta=sampler_cfg.eta,
                  device=cond.device, progress=progress, callback=callback, timesteps=timesteps)

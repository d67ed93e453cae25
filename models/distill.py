"""Latent Consistency Distillation (LCD): turn a trained ε-prediction teacher into a few-step
latent consistency model (docs/method.md §4.4-§4.5).

GL-LCM as published is *not* a consistency model (§4.4): it is the BS-LDM ε-objective sampled with
the multistep consistency sampler. This module adds the real thing on top of a trained teacher.

Consistency function (LCM parameterisation, §4.5), for an ε-prediction network ε̂_θ:

    x̂0(x, t)  = (x − √(1−ᾱ_t)·ε̂_θ(x, t)) / √ᾱ_t
    f_θ(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t),
    c_skip(t) = σ_d² / ((s t)² + σ_d²),  c_out(t) = s t / √((s t)² + σ_d²),  σ_d = 0.5, s = 10,

so that f_θ(x, 0) = x exactly (the boundary condition). One LCD step on the skipping-step grid
t_n ∈ {k−1, 2k−1, …, T−1}, k = T/N (N = 50 → k = 20):

    t_start ~ U(grid),  t_prev = max(t_start − k, 0)
    z_start = √ᾱ·z0 + √(1−ᾱ)·ε_off                                      (teacher's training noise)
    pred    = f_θ(z_start, t_start)                                       (student, with gradient)
    x̂0, ε̂   = teacher at (z_start, t_start) [CFG: x̂ = x̂_c + ω(x̂_c − x̂_∅)]   (frozen)
    ẑ_prev  = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂                                   (DDIM, η = 0)
    target  = f_θ⁻(ẑ_prev, t_prev)                                        (EMA target, no gradient)
    loss    = mean((pred − target)²)  or  mean(√((pred − target)² + c²) − c)   (pseudo-Huber)

after which the caller steps the optimiser on θ and updates the target,
θ⁻ ← μ·θ⁻ + (1−μ)·θ (μ = 0.95): ``utils.ema.EMA(student, μ)``, whose ``shadow`` is θ⁻. With the teacher exact, the fixed point of this iteration is the
composition of the teacher's DDIM steps along the grid down to t = 0, i.e. the teacher's N-step
DDIM solution of the probability-flow ODE (tests/test_distill.py checks this on a Gaussian).
Reaching it takes at least ≈ N/(1−μ) optimiser steps (1000 for the defaults): the boundary condition
at t = 0 has to climb the N grid levels one at a time, each behind an EMA with time constant
1/(1−μ). The distilled student is sampled like any ε-model: ``models.samplers.sample(
make_denoiser(student, …), schedule, shape, "lcm", steps)`` with 1-8 steps from the same grid.

Decisions (documented here because they are not in the reference code):

* **Noise.** z_start is noised with *offset* noise, coefficient ``diffusion_cfg.offset_noise``,
  exactly as the teacher was trained (§3.3, §4.5 caveat). The teacher's ε̂ is therefore queried on
  the marginal it was fitted to. The PF-ODE strictly assumes ε ~ N(0, I); with offset noise the
  start points only carry a slightly wider per-channel mean (variance 1/(h·w) + c² instead of
  1/(h·w)). The DDIM step itself is deterministic and the sampler still starts from plain N(0, I).
* **Condition.** All three networks (student, target, teacher) get the *training-time* input
  ``model_input_train(x, c, t, schedule, cond_mode)``: [x ; c] for ``clean``, [x ; √ᾱ_t·c] for
  ``bug_compatible`` / ``scaled_consistent``. The teacher is only accurate on the inputs it was
  trained on, and the student starts as a copy of it, so at initialisation student ≡ teacher and
  the distillation begins from the DDIM-consistent point. Consequence: a student distilled from a
  ``bug_compatible`` teacher should be *sampled* with ``cond_mode="scaled_consistent"`` (whose
  sampling input is the training input); sampling it with ``bug_compatible`` reproduces the
  authors' train/test mismatch (§3.5).
* **Guidance.** ``distill_cfg.guidance_scale`` = ω; ω = 0 (default) is plain PF-ODE distillation
  with a single teacher call. ω > 0 runs the teacher a second time with the condition channels
  zeroed and uses x̂ = x̂_c + ω(x̂_c − x̂_∅) for both x̂0 and ε̂ (LCM form). That is only meaningful
  for a teacher fine-tuned with condition dropout (zeroed condition channels, e.g. p = 0.1): the
  published teachers never saw a zeroed condition. The student has no ω embedding, so it distils
  one fixed ω.
* **Outputs.** Only the first C output channels (C = channels of z0, i.e. 4) are used as ε̂, as for
  the diffusion loss; the extra 4 channels of the reference UNet stay unsupervised.
* **No clipping.** The teacher's x̂0 is not clamped (TAT is a sampling heuristic, §4.3); clipping
  inside the ODE step would make the distilled trajectories differ from the teacher's PF-ODE.
* **Target network.** θ⁻ is ``utils.ema.EMA(student, μ).shadow``, updated by ``EMA.update`` after
  every optimiser step; ldm_train.py saves it as the checkpoint's ``ema`` and samples it.
"""
from __future__ import annotations

from typing import Callable

import torch

from models.samplers import consistency_scalings
from models.schedule import NoiseSchedule, model_input_train, offset_noise
from utils.config import DiffusionConfig, DistillConfig

__all__ = ["ddim_grid", "consistency_output", "ddim_solver_step", "distance", "consistency_distillation_loss",
           "LOSS_TYPES"]

LOSS_TYPES = ("l2", "huber")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# Grid, consistency function, solver step, distance
# --------------------------------------------------------------------------------------------------

def ddim_grid(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> torch.Tensor:
    """Skipping-step grid {k−1, 2k−1, …, N·k−1}, k = T // N, ascending (§4.5).

    T = 1000, N = 50 gives 19, 39, …, 999 (the same points as :func:`models.samplers.timesteps_lcm`,
    in the opposite order); N = T gives 0, …, T−1. k = T // N as in diffusers, so when N does not
    divide T the grid stops below T−1.

    Returns:
        (N,) long tensor.
    """
    T, N = num_train_timesteps, num_ddim_timesteps
    if isinstance(N, bool) or not isinstance(N, int) or not 1 <= N <= T:
        raise ValueError(f"num_ddim_timesteps must be an integer in [1, {T}], got {N!r}")
    k = T // N
    return torch.arange(1, N + 1, dtype=torch.long) * k - 1


def _per_sample(t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """t as a (B,) long tensor on ``like``'s device."""
    t = torch.as_tensor(t, device=like.device, dtype=torch.long)
    return t.expand(like.shape[0]) if t.ndim == 0 else t


def consistency_output(eps: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, schedule: NoiseSchedule,
                       sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> torch.Tensor:
    """f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂0(x_t, t), with x̂0 from the ε prediction (§4.5).

    At t = 0, c_skip = 1 and c_out = 0 exactly, so f(x, 0) = x bit for bit (for a finite ε̂).

    Args:
        eps: (B, C, h, w) ε̂ at (x_t, t) (the first C channels of the network output).
        x_t: (B, C, h, w) noisy latent.
        t: (B,) long timesteps or one int.
        schedule: the teacher's noise schedule.
        sigma_data, timestep_scaling: σ_d and s of :func:`models.samplers.consistency_scalings`.

    Returns:
        (B, C, h, w) tensor in x_t's dtype.
    """
    t = _per_sample(t, x_t)
    x0 = schedule.predict_x0(x_t, eps, t)
    c_skip, c_out = consistency_scalings(t.double(), sigma_data, timestep_scaling)
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    c_skip = c_skip.to(x_t.dtype).reshape(shape)
    c_out = c_out.to(x_t.dtype).reshape(shape)
    return c_skip * x_t + c_out * x0


def ddim_solver_step(x0: torch.Tensor, eps: torch.Tensor, t_prev: torch.Tensor | int,
                     schedule: NoiseSchedule) -> torch.Tensor:
    """Deterministic DDIM step (η = 0) to ``t_prev`` from a prediction (x̂0, ε̂) made at the current t:
    ẑ_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev)·ε̂ (per-sample t_prev ≥ 0).

    Equals :func:`models.samplers.ddim_step` without clipping, but with one t_prev per sample.
    Shapes: x0, eps (B, C, h, w); t_prev (B,) long or int.
    """
    return schedule.add_noise(x0, eps, _per_sample(t_prev, x0))


def distance(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "huber",
             huber_c: float = 0.001) -> torch.Tensor:
    """Consistency distance averaged over all elements, in fp32.

    ``l2``: mean((pred − target)²).  ``huber``: pseudo-Huber mean(√((pred − target)² + c²) − c),
    ≈ d²/(2c) for |d| ≪ c and ≈ |d| − c for |d| ≫ c (so with c = 0.001 it is nearly L1).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff.pow(2).mean()
    if huber_c <= 0:
        raise ValueError(f"huber_c must be > 0, got {huber_c}")
    # √(d² + c²) − c written as d² / (√(d² + c²) + c): the same value without the cancellation that
    # loses most fp32 digits when |d| ≪ c (the regime the loss is meant to reach).
    sq = diff.pow(2)
    return (sq / (torch.sqrt(sq + huber_c ** 2) + huber_c)).mean()


# --------------------------------------------------------------------------------------------------
# One distillation step
# --------------------------------------------------------------------------------------------------

def _eps(model: Model, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
         cond_mode: str) -> torch.Tensor:
    """First C output channels of ``model`` on the training-time input [x ; c or √ᾱ_t·c]."""
    c = x.shape[1]
    out = model(model_input_train(x, cond, t, schedule, cond_mode), t)
    if out.shape[1] < c:
        raise ValueError(f"model returned {out.shape[1]} channels, need at least {c}")
    return out[:, :c].to(x.dtype)


def consistency_distillation_loss(student: Model, target: Model, teacher: Model, schedule: NoiseSchedule,
                                  z0: torch.Tensor, cond: torch.Tensor, distill_cfg: DistillConfig,
                                  diffusion_cfg: DiffusionConfig, generator: torch.Generator | None = None
                                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """One latent-consistency-distillation loss evaluation (§4.5; see the module docstring).

    Gradients flow into ``student`` only: the teacher and the target run under ``torch.no_grad``.
    The caller does backward / optimiser step and then ``EMA.update``. Put the teacher and
    the target in ``eval()`` and ``requires_grad_(False)`` (``utils.ema.EMA`` does that for the
    target).

    Args:
        student: ``student(x (B, 2C, h, w), t (B,) long) -> (B, >= C, h, w)`` ε-prediction network θ
            (initialised from the teacher).
        target: the EMA target network θ⁻, same signature.
        teacher: the frozen ε-prediction teacher, same signature and same ``schedule``.
        schedule: the teacher's noise schedule (T = ``schedule.num_train_timesteps``).
        z0: (B, C, h, w) clean target (soft-tissue) latents.
        cond: (B, C, h, w) condition (CXR) latents.
        distill_cfg: N (``num_ddim_timesteps``), loss type and c, σ_d, s, guidance scale ω.
        diffusion_cfg: the teacher's ``offset_noise`` and ``cond_mode``.
        generator: optional; the grid index n is drawn first, then ε, then the offset δ.

    Returns:
        ``(loss, logs)``: scalar fp32 loss and plain floats ``{"loss", "mse", "t_mean"}``
        (``mse`` = mean squared pred − target whatever the loss type).
    """
    w = distill_cfg.guidance_scale
    if w < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {w}")
    if distill_cfg.loss not in LOSS_TYPES:
        raise ValueError(f"distill.loss must be one of {LOSS_TYPES}, got {distill_cfg.loss!r}")
    grid = ddim_grid(schedule.num_train_timesteps, distill_cfg.num_ddim_timesteps)
    k = int(grid[0]) + 1
    b, device = z0.shape[0], z0.device
    draw_device = generator.device if generator is not None else device
    index = torch.randint(0, len(grid), (b,), generator=generator, device=draw_device).cpu()
    t_start = grid[index].to(device)
    t_prev = (t_start - k).clamp(min=0)
    noise = offset_noise(z0.shape, diffusion_cfg.offset_noise, generator, device, z0.dtype)
    z_start = schedule.add_noise(z0, noise, t_start)
    mode, scalings = diffusion_cfg.cond_mode, (distill_cfg.sigma_data, distill_cfg.timestep_scaling)

    # Online prediction f_θ(z_start, t_start).
    pred = consistency_output(_eps(student, z_start, cond, t_start, schedule, mode), z_start, t_start, schedule,
                              *scalings)

    with torch.no_grad():
        # Teacher ODE step t_start -> t_prev (DDIM, η = 0), optionally with classifier-free guidance.
        eps_t = _eps(teacher, z_start, cond, t_start, schedule, mode)
        if w > 0:
            # x̂0 is affine in ε̂ at fixed z, so guiding ε̂ guides x̂0 identically:
            # x̂ = x̂_c + ω(x̂_c − x̂_∅) for both.
            eps_u = _eps(teacher, z_start, torch.zeros_like(cond), t_start, schedule, mode)
            eps_t = eps_t + w * (eps_t - eps_u)
        x0_t = schedule.predict_x0(z_start, eps_t, t_start)
        z_prev = ddim_solver_step(x0_t, eps_t, t_prev, schedule)
        # Target f_θ⁻(ẑ_prev, t_prev); at t_prev = 0 this is ẑ_prev itself (boundary condition).
        tgt = consistency_output(_eps(target, z_prev, cond, t_prev, schedule, mode), z_prev, t_prev, schedule,
                                 *scalings)

    loss = distance(pred, tgt, distill_cfg.loss, distill_cfg.huber_c)
    mse = (pred.detach().float() - tgt.float()).pow(2).mean()
    return loss, {"loss": loss.item(), "mse": mse.item(), "t_mean": t_start.float().mean().item()}

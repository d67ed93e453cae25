"""Samplers: ancestral DDPM, DDIM and the multistep (latent) consistency sampler, with temporal
adaptive thresholding (docs/method.md §4.1-§4.3, §4.5).

Design: the network, the schedule and the sampler are separate. Every per-step
function is pure: it receives the schedule, the noise estimate, the timestep(s), the current latent,
the clip range of this step and the generator, and keeps no counter. Condition handling, guidance
and the global/local dual path live in the caller's ``denoise_fn``:

    denoise_fn(x_t (B, C, h, w), t (B,) long) -> eps_hat (B, C, h, w)

Temporal adaptive thresholding (TAT, §4.3): inside every step the predicted clean latent x̂0 is
clamped to [−r_j, r_j] with r_j = r0 + κ·j (j = 0 is the noisiest step); BS-LDM's off-by-one
(r_0 = r_1 = r0, r_j = r0 + κ(j−1)) is available through ``clip_ranges(..., off_by_one=True)``.

All noise is drawn from the generator passed in, so a seeded generator makes a run reproducible.
A batch stacked from independent runs (GL-LCM's global and local paths, 2B) is one run of
:func:`sample` with :class:`BlockGenerators` and per-element clip ranges (:func:`block_clip_ranges`):
every block then gets, number for number, what it would get alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from models.schedule import NoiseSchedule, randn

__all__ = ["StepOutput", "BlockGenerators", "timesteps_ddpm", "timesteps_ddim", "timesteps_lcm", "clip_ranges",
           "clip_ranges_by_time", "block_clip_ranges", "consistency_scalings", "draw_noise", "ddpm_step", "ddim_step",
           "lcm_step", "sampler_step", "sample_timesteps", "sampler_grid", "tat_ranges", "sample", "SAMPLERS"]

SAMPLERS = ("ddpm", "ddim", "lcm")

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
# r of one step: one float for the batch, a (B, 1, 1, 1) tensor of per-element ranges, or None (no clipping).
ClipRange = float | torch.Tensor | None


@dataclass(frozen=True)
class BlockGenerators:
    """The generators of a batch stacked from K equal blocks, e.g. GL-LCM's [global ; local] (2B).

    Block k (rows k·B … (k+1)·B − 1) draws from ``blocks[k]`` (a generator, a list of B generators,
    or None for the global RNG), blocks in order, exactly the numbers a run on that block alone
    draws: a single generator draws its block in one piece, as it would alone (drawing it row by row
    gives other numbers). Not a list, so that it cannot be mistaken for per-element generators.
    """

    blocks: tuple[Generators, ...]


class StepOutput(NamedTuple):
    """Result of one sampler step.

    prev_sample: the latent for the next step (after the last step: the final sample).
    pred_x0: the clipped x̂0 of this step (for LCM, before the c_skip/c_out combination).
    """

    prev_sample: torch.Tensor
    pred_x0: torch.Tensor


# --------------------------------------------------------------------------------------------------
# Timestep grids and clip ranges
# --------------------------------------------------------------------------------------------------

def timesteps_ddpm(num_train_timesteps: int = 1000) -> list[int]:
    """All training timesteps, T−1 down to 0 (BS-LDM: ``set_timesteps`` is never called, §4.1)."""
    return list(range(num_train_timesteps - 1, -1, -1))


def timesteps_ddim(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """``steps`` timesteps with "trailing" spacing: round(T − j·T/steps) − 1, j = 0..steps−1.

    The grid always starts at T−1 (the noisiest timestep, where sampling starts from pure noise) and,
    when T/steps is an integer, coincides with the LCM grid (50 steps: 999, 979, …, 19; 1000 steps:
    999, …, 0). diffusers' default "leading" spacing (980, 960, …, 0 for 50 steps) would skip the
    noisiest 19 timesteps.
    """
    _check_steps(steps, num_train_timesteps)
    return [int(round(num_train_timesteps - j * num_train_timesteps / steps)) - 1 for j in range(steps)]


def timesteps_lcm(steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """LCM inference timesteps (diffusers ``LCMScheduler.set_timesteps`` with strength 1, §4.2, §4.5).

    The distillation grid is {1, …, N}·k − 1 with k = T // N (N = ``original_steps``), reversed
    (999, 979, …, 19 for N = 50); ``steps`` indices floor(linspace(0, N, steps, endpoint=False)) are
    taken from it. 50 steps gives the full grid; 4 steps gives 999, 759, 499, 259.

    Raises:
        ValueError: if ``steps`` > ``original_steps`` (the grid has no more points).
    """
    _check_steps(steps, num_train_timesteps)
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"original_steps must be in [1, {num_train_timesteps}], got {original_steps}")
    if steps > original_steps:
        raise ValueError(f"steps ({steps}) cannot exceed original_steps ({original_steps})")
    k = num_train_timesteps // original_steps
    grid = [n * k - 1 for n in range(original_steps, 0, -1)]
    # floor(i·N/steps) computed in integers, identical to numpy's floor(linspace(...)) here.
    return [grid[(i * original_steps) // steps] for i in range(steps)]


def _check_steps(steps: int, num_train_timesteps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_train_timesteps}], got {steps!r}")


def clip_ranges(r0: float, kappa: float, n_steps: int, off_by_one: bool = False) -> list[float]:
    """Temporal adaptive thresholding ranges r_j, j = 0..n_steps−1 (§4.3).

    r_j = r0 + κ·j (GL-LCM, and the intended form); with ``off_by_one`` r_0 = r0 and
    r_j = r0 + κ·(j−1) for j ≥ 1 (BS-LDM rebuilt its scheduler *after* each step, §7.16).

    Examples: BS-LDM (1.4, 0.003, 1000, off_by_one=True) ends at 4.394; GL-LCM SZCH global path
    (2.0, 0.025, 50) goes 2.0 → 3.225.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    return [r0 + kappa * (max(j - 1, 0) if off_by_one else j) for j in range(n_steps)]


def clip_ranges_by_time(r0: float, kappa: float, timesteps: Sequence[int], num_train_timesteps: int = 1000,
                        original_steps: int = 50) -> list[float]:
    """TAT ranges indexed by timestep: r(t) = r0 + κ·(T − 1 − t)·N/T, the range a run on the N-point
    grid (N = ``original_steps``, GL-LCM's 50) uses at timestep t.

    On the 50-point grid this equals :func:`clip_ranges` (999, 979, … → r0, r0 + κ, …). With fewer
    steps the step-indexed ranges end tight (4 LCM steps: 2.0 → 2.075 for r0 = 2, κ = 0.025) while
    these reach what the 50-step run reaches at the same noise level (999, 759, 499, 259 → 2.0, 2.3,
    2.625, 2.925). An option of this project (``sampler.clip_index: time``); the papers index by step.
    """
    T, N = num_train_timesteps, original_steps
    return [r0 + kappa * (T - 1 - int(t)) * N / T for t in timesteps]


def block_clip_ranges(ranges: Sequence[Sequence[float] | None], rows: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor | None:
    """Per-element clip ranges of a batch stacked from blocks of ``rows`` elements (see
    :class:`BlockGenerators`): ``ranges[k][j]`` is block k's r at step j.

    Returns:
        (n_steps, K·rows, 1, 1, 1) tensor (entry j is step j's range, broadcastable to the
        (K·rows, C, h, w) latent), or None when no block is clipped. Clamping with a float32 copy of
        r is the same as clamping with the float r, so each block is clipped as it would be alone.

    Raises:
        ValueError: some blocks clipped and others not, or blocks of different lengths.
    """
    if all(r is None for r in ranges):
        return None
    if any(r is None for r in ranges) or len({len(r) for r in ranges}) != 1:
        raise ValueError("every block needs clip ranges of the same length, or none of them")
    table = torch.tensor([list(r) for r in ranges], dtype=dtype, device=device)            # (K, n)
    return table.T.repeat_interleave(rows, dim=1)[:, :, None, None, None]


def consistency_scalings(t: torch.Tensor | float, sigma_data: float = 0.5,
                         timestep_scaling: float = 10.0) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """LCM boundary-condition scalings for discrete timesteps (§4.2, §4.5).

    With u = s·t (s = ``timestep_scaling``):  c_skip = σ_d² / (u² + σ_d²),  c_out = u / √(u² + σ_d²),
    so f(x, t) = c_skip·x + c_out·x̂0 equals x exactly at t = 0. Golden values (σ_d = 0.5, s = 10):
    c_skip(19) = 6.93e-6, c_out(19) = 0.9999965.

    Args:
        t: timestep(s), a number or a tensor of any shape (elementwise).

    Returns:
        (c_skip, c_out), of the same kind and shape as ``t``.
    """
    u = t * timestep_scaling
    denom = u ** 2 + sigma_data ** 2
    return sigma_data ** 2 / denom, u / denom ** 0.5


def _clip(x0: torch.Tensor, clip_range: ClipRange) -> torch.Tensor:
    return x0 if clip_range is None else x0.clamp(-clip_range, clip_range)


def draw_noise(shape: tuple[int, ...] | torch.Size, generator: Generators | BlockGenerators,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) of ``shape`` (B, ...): :func:`models.schedule.randn`, block by block for
    :class:`BlockGenerators` (B a multiple of the number of blocks)."""
    if not isinstance(generator, BlockGenerators):
        return randn(shape, generator, device, dtype)
    k = len(generator.blocks)
    if shape[0] % k:
        raise ValueError(f"a batch of {shape[0]} cannot be split into {k} blocks")
    rows = (shape[0] // k, *shape[1:])
    return torch.cat([randn(rows, g, device, dtype) for g in generator.blocks])


# --------------------------------------------------------------------------------------------------
# Per-step functions (pure)
# --------------------------------------------------------------------------------------------------

def ddpm_step(schedule: NoiseSchedule, eps: torch.Tensor, t: int, x_t: torch.Tensor,
              clip_range: ClipRange = None, generator: Generators | BlockGenerators = None,
              t_prev: int | None = None) -> StepOutput:
    """One ancestral DDPM step with x̂0 clipping (diffusers ``DDPMScheduler.step``, §4.1).

    x̂0 = clamp((x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t, ±r);  with α' = ᾱ_t/ᾱ_prev, β' = 1 − α':
    μ = √ᾱ_prev·β'/(1−ᾱ_t)·x̂0 + √α'·(1−ᾱ_prev)/(1−ᾱ_t)·x_t,
    x_prev = μ + σ·z with σ² = max((1−ᾱ_prev)/(1−ᾱ_t)·β', 1e-20) ("fixed_small"), and no noise when
    t_prev < 0 (the last step, ᾱ_{−1} := 1).

    Args:
        schedule: the noise schedule.
        eps: (B, C, h, w) noise estimate ε̂ at t.
        t: current timestep (one int for the batch).
        x_t: (B, C, h, w) current latent.
        clip_range: r of this step: a float, a (B, 1, 1, 1) tensor of per-element ranges, or None
            for no clipping.
        generator: source of the step noise z (a generator, a list of B, :class:`BlockGenerators`).
        t_prev: previous timestep; default t − 1 (the reference's 1000-step chain).

    Returns:
        :class:`StepOutput` (x_prev, clipped x̂0).
    """
    t_prev = t - 1 if t_prev is None else t_prev
    a_t, a_prev = schedule.alpha_cumprod(t), schedule.alpha_cumprod(t_prev)
    alpha = a_t / a_prev
    beta = 1.0 - alpha
    x0 = _clip(schedule.predict_x0(x_t, eps, t), clip_range)
    mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_prev) / (1 - a_t)) * x_t
    if t_prev < 0:
        return StepOutput(mean, x0)
    variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    z = draw_noise(x_t.shape, generator, x_t.device, x_t.dtype)
    return StepOutput(mean + math.sqrt(variance) * z, x0)


def ddim_step(schedule: NoiseSchedule, eps: torch.Tensor, t: int, t_prev: int, x_t: torch.Tensor,
              clip_range: ClipRange = None, generator: Generators | BlockGenerators = None,
              eta: float = 0.0) -> StepOutput:
    """One DDIM step (Song et al. 2021, eq. 12) from t to t_prev (t_prev = −1 means ᾱ = 1: the end).

    x̂0 = clamp(predict_x0(x_t, ε̂), ±r); ε̂ is then re-derived from the clipped x̂0, so that
    (x̂0, ε̂) stay consistent with x_t when clipping bites (otherwise a huge raw ε̂ would re-enter
    through the direction term);
    σ = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_prev);
    x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̂ + σ·z.
    η = 0 is deterministic; η = 1 with t_prev = t − 1 equals :func:`ddpm_step`.

    Args: as :func:`ddpm_step`, plus ``eta`` (η ≥ 0). Returns :class:`StepOutput`.
    """
    a_t, a_prev = schedule.alpha_cumprod(t), schedule.alpha_cumprod(t_prev)
    x0 = _clip(schedule.predict_x0(x_t, eps, t), clip_range)
    if clip_range is not None:
        eps = schedule.predict_eps(x_t, x0, t)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
    x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * draw_noise(x_t.shape, generator, x_t.device, x_t.dtype)
    return StepOutput(x_prev, x0)


def lcm_step(schedule: NoiseSchedule, eps: torch.Tensor, t: int, t_next: int | None, x_t: torch.Tensor,
             clip_range: ClipRange = None, generator: Generators | BlockGenerators = None,
             sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> StepOutput:
    """One multistep consistency-sampler step (diffusers ``LCMScheduler.step``, §4.2).

    x̂0 = clamp(predict_x0(x_t, ε̂), ±r);  denoised = c_out(t)·x̂0 + c_skip(t)·x_t;
    if ``t_next`` is None (last step) return denoised, else re-noise with *fresh* noise:
    x_next = √ᾱ_next·denoised + √(1−ᾱ_next)·z (neither x_t nor ε̂ is reused).

    Args: as :func:`ddpm_step`; ``t_next`` is the next (smaller) grid timestep or None;
    ``sigma_data``, ``timestep_scaling`` as in :func:`consistency_scalings`.
    Returns :class:`StepOutput` (x_next or the final denoised latent, clipped x̂0).
    """
    x0 = _clip(schedule.predict_x0(x_t, eps, t), clip_range)
    c_skip, c_out = consistency_scalings(float(t), sigma_data, timestep_scaling)
    denoised = c_out * x0 + c_skip * x_t
    if t_next is None:
        return StepOutput(denoised, x0)
    a_next = schedule.alpha_cumprod(t_next)
    z = draw_noise(x_t.shape, generator, x_t.device, x_t.dtype)
    return StepOutput(math.sqrt(a_next) * denoised + math.sqrt(1 - a_next) * z, x0)


# --------------------------------------------------------------------------------------------------
# Loop
# --------------------------------------------------------------------------------------------------

def sampler_step(name: str, schedule: NoiseSchedule, eps: torch.Tensor, t: int, t_next: int | None,
                 x_t: torch.Tensor, clip_range: ClipRange, generator=None, eta: float = 0.0,
                 sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> StepOutput:
    """One step of sampler ``name`` from grid timestep ``t`` to ``t_next`` (None after the last step)."""
    if name == "lcm":
        return lcm_step(schedule, eps, t, t_next, x_t, clip_range, generator, sigma_data, timestep_scaling)
    t_prev = -1 if t_next is None else t_next
    if name == "ddim":
        return ddim_step(schedule, eps, t, t_prev, x_t, clip_range, generator, eta)
    return ddpm_step(schedule, eps, t, x_t, clip_range, generator, t_prev=t_prev)


def sample_timesteps(sampler_name: str, steps: int | None, num_train_timesteps: int = 1000,
                     original_steps: int = 50) -> list[int]:
    """The timestep list a :func:`sample` run visits (``steps=None``: 1000 for DDPM, 50 otherwise).

    A caller that needs the grid for its clip ranges too computes it once and passes it to both
    (``sample(..., timesteps=...)``), instead of having it rebuilt.
    """
    _check_sampler(sampler_name)
    if sampler_name == "ddpm":
        if steps is None or steps == num_train_timesteps:
            return timesteps_ddpm(num_train_timesteps)
        return timesteps_ddim(steps, num_train_timesteps)
    steps = original_steps if steps is None else steps
    if sampler_name == "ddim":
        return timesteps_ddim(steps, num_train_timesteps)
    return timesteps_lcm(steps, original_steps, num_train_timesteps)


def sampler_grid(sampler_cfg, schedule: NoiseSchedule, original_steps: int = 50) -> list[int]:
    """The timestep grid of the configured sampler (``sampler_cfg.name``, ``steps``), descending; the
    one computation of it in a run, handed to :func:`tat_ranges` and :func:`sample`."""
    return sample_timesteps(sampler_cfg.name, sampler_cfg.steps, schedule.num_train_timesteps, original_steps)


def tat_ranges(sampler_cfg, r0: float, num_train_timesteps: int = 1000, original_steps: int = 50,
               timesteps: Sequence[int] | None = None) -> list[float] | None:
    """Temporal adaptive thresholding ranges for the configured sampler, or None when clipping is off.

    ``sampler.clip_index``: ``step`` (the papers, r_j = r0 + κ·j, BS-LDM's off-by-one optional) or
    ``time`` (:func:`clip_ranges_by_time`: the range the 50-step run has at the same
    timestep, so a few-step run is not clipped tighter than the many-step one). ``timesteps``: the
    run's grid (:func:`sampler_grid`); only when it is not given is it computed here.
    """
    if not sampler_cfg.clip:
        return None
    if timesteps is None:
        timesteps = sample_timesteps(sampler_cfg.name, sampler_cfg.steps, num_train_timesteps, original_steps)
    if sampler_cfg.clip_index == "time":
        if sampler_cfg.clip_off_by_one:
            raise ValueError("sampler.clip_off_by_one applies to step-indexed ranges (clip_index: step) only")
        return clip_ranges_by_time(r0, sampler_cfg.clip_kappa, timesteps, num_train_timesteps, original_steps)
    return clip_ranges(r0, sampler_cfg.clip_kappa, len(timesteps), sampler_cfg.clip_off_by_one)


def _check_sampler(sampler_name: str) -> None:
    if sampler_name not in SAMPLERS:
        raise ValueError(f"sampler_name must be one of {SAMPLERS}, got {sampler_name!r}")


def _initial_latent(shape: tuple[int, ...], generator: Generators | BlockGenerators, x_T: torch.Tensor | None,
                    device: torch.device | str | None) -> torch.Tensor:
    """x_T (B, C, h, w): the given one (moved to ``device`` if given), or drawn from ``generator`` on
    ``device`` (default: the first generator's device, else CPU)."""
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        return x_T.to(device) if device is not None else x_T
    if device is None:
        first = generator.blocks[0] if isinstance(generator, BlockGenerators) else generator
        first = first[0] if isinstance(first, (list, tuple)) else first
        device = first.device if first is not None else "cpu"
    return draw_noise(shape, generator, device)


@torch.no_grad()
def sample(denoise_fn: DenoiseFn, schedule: NoiseSchedule, shape: tuple[int, ...],
           sampler_name: str = "lcm", steps: int | None = None,
           clip_ranges: Sequence[ClipRange] | torch.Tensor | None = None,
           generator: Generators | BlockGenerators = None,
           eta: float = 0.0, x_T: torch.Tensor | None = None, progress: bool = False, *,
           device: torch.device | str | None = None, original_steps: int = 50,
           sigma_data: float = 0.5, timestep_scaling: float = 10.0,
           callback: Callable[[int, int, StepOutput], None] | None = None,
           timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """Run a sampler from x_T ~ N(0, I) (plain noise, no offset component, §3.3) to x_0.

    The one sampling loop of the project: the global-local dual path runs through it too, as a
    2B batch (:func:`models.global_local.dual_path_sample`).

    Args:
        denoise_fn: ``denoise_fn(x_t (B, C, h, w), t (B,) long) -> eps_hat (B, C, h, w)``; builds the
            network input (condition mode, guidance) itself.
        schedule: the noise schedule the model was trained with.
        shape: (B, C, h, w) of the latent to sample (C = 4 target channels).
        sampler_name: ``"ddpm"`` (ancestral; ``steps`` None or T reproduces BS-LDM's 1000-step chain,
            fewer steps use the trailing grid with the DDPM posterior between grid points), ``"ddim"``
            (trailing grid, ``eta``) or ``"lcm"`` (grid from :func:`timesteps_lcm`).
        steps: number of steps; None = 1000 for DDPM, ``original_steps`` (50) otherwise.
        clip_ranges: r_j per step (length = number of steps, e.g. from :func:`clip_ranges`; entries
            may be (B, 1, 1, 1) per-element tensors, e.g. from :func:`block_clip_ranges`), or None
            for no clipping.
        generator: source of x_T and of every step's noise: a generator, a list of B generators or
            :class:`BlockGenerators`.
        eta: DDIM η.
        x_T: optional initial latent (B, C, h, w) instead of drawing one (e.g. shared by two paths).
        progress: show a tqdm bar.
        device: where the latent lives (default: x_T's device, else the generator's, else CPU).
        original_steps, sigma_data, timestep_scaling: LCM grid size N and boundary scalings.
        callback: called as ``callback(j, t, step_output)`` after every step.
        timesteps: the grid from :func:`sample_timesteps`, when the caller has already computed it
            (then ``steps`` must be None).

    Returns:
        (B, C, h, w) final latent.
    """
    if timesteps is None:
        timesteps = sample_timesteps(sampler_name, steps, schedule.num_train_timesteps, original_steps)
    elif steps is not None:
        raise ValueError("give steps or timesteps, not both")
    _check_sampler(sampler_name)
    n = len(timesteps)
    if clip_ranges is not None and len(clip_ranges) != n:
        raise ValueError(f"clip_ranges has {len(clip_ranges)} entries for {n} steps")
    x = _initial_latent(shape, generator, x_T, device)
    # All timestep tensors once, not per step.
    t_batch = torch.tensor(timesteps, dtype=torch.long, device=x.device)[:, None].expand(n, x.shape[0])

    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"{sampler_name} x{n}", leave=False)
    for j in iterator:
        t = timesteps[j]
        t_next = timesteps[j + 1] if j + 1 < n else None
        r = None if clip_ranges is None else clip_ranges[j]
        eps = denoise_fn(x, t_batch[j])
        out = sampler_step(sampler_name, schedule, eps, t, t_next, x, r, generator, eta, sigma_data,
                           timestep_scaling)
        x = out.prev_sample
        if callback is not None:
            callback(j, t, out)
    return x

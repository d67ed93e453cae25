"""GL-LCM global-local dual-path sampling with Local-Enhanced Guidance (docs/method.md §5.1, §5.2).

Two latent paths are sampled side by side with the same conditional ε-model:

* the **global** path, conditioned on the whole CXR latent c_g = VQ(CXR);
* the **local** path, conditioned on the lung-masked CXR latent c_l = VQ(Masked_CXR), whose noise
  estimate is modified by Local-Enhanced Guidance (LEG) before its sampler step.

Both paths start from the *same* initial noise x_T; afterwards they share nothing but the timestep
grid: each has its own temporal-adaptive-thresholding clip ranges r_j = r0 + κ·j (r0 = clip_r0_global
or clip_r0_local, the same κ, §4.3) and draws its re-noising noise from its own generator(s), so the
global path is exactly the single-path sampler of :func:`models.samplers.sample` and does not depend
on anything the local path does. Decoding and pixel-space fusion live in :mod:`models.fusion`.

Structure. The two paths are ONE run of the project's one sampler loop, :func:`models.samplers.sample`,
on the stacked latent [x_g ; x_l] (2B, 4, h, w). :func:`dual_path_denoiser` is its ``denoise_fn``: the
branches' network call, and LEG, which needs ε_g or a third branch and so belongs where the local
path's estimate is formed. :class:`models.samplers.BlockGenerators` gives each half its own
generator(s) and :func:`models.samplers.block_clip_ranges` its own clip ranges; the steps are
elementwise, so each half is stepped exactly as it would be alone. :func:`dual_path_sample` computes
the grid and the ranges once and wires these together.

Cost. Every step is ONE network call on the concatenated batch [x_g ; c_g] + [x_l ; c_l] (2B), or
3B for ``global_cond`` LEG, which adds [x_l ; c_g] (§9: one batch-2 call is ~1.26x cheaper than two
calls on a CPU). ``batched=False`` makes separate calls per branch instead; it exists to test the
batched path and for memory-bound devices.

Random draws, in this order within step j (only the order *per generator* matters):

1. (before step 0, only when ``x_T`` is None) x_T from ``generators_global``;
2. LEG ξ_j (mode ``noise`` only) from ``generators_local``, even when α = 1, so that the local
   stream has the same layout for every α (drawn inside the denoiser);
3. the global path's step noise from ``generators_global`` (none on the last step);
4. the local path's step noise from ``generators_local`` (none on the last step).

(3 and 4 are the stacked batch's step noise, its blocks in order.) This is the reference's order
(``randn_like`` for LEG, then the global step, then the local step) with per-path generators instead
of the unseeded global RNG (§7.20). A list of B generators per path makes every batch element's
sample independent of the batch it is computed in (LEG's std is per sample too).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from models.inference import LATENT_CHANNELS
from models.samplers import (BlockGenerators, DenoiseFn, Generators, StepOutput, block_clip_ranges, sample,
                             sampler_grid, tat_ranges)
from models.schedule import NoiseSchedule, model_input_sample, randn

__all__ = ["LEG_MODES", "local_enhanced_guidance", "dual_path_denoiser", "dual_path_sample"]

LEG_MODES = ("none", "noise", "global_pred", "global_cond")

DualCallback = Callable[[int, int, StepOutput, StepOutput], None]


# --------------------------------------------------------------------------------------------------
# Local-Enhanced Guidance (§5.2)
# --------------------------------------------------------------------------------------------------

def local_enhanced_guidance(eps_local: torch.Tensor, alpha: float, mode: str,
                            eps_ref: torch.Tensor | None = None, generator: Generators = None,
                            std_over: torch.Tensor | None = None) -> torch.Tensor:
    """Guided local-path noise estimate ε̃_l (docs/method.md §5.2, §7.3).

    Modes:

    * ``none``: ε̃_l = ε_l ("vanilla guidance", the α = 1 row of the ablation).
    * ``noise`` (A, the released code's active line): ε̃_l = α·ε_l + (1 − α)·ξ/σ, ξ ~ N(0, I) fresh
      (drawn here from ``generator``, shape of ``eps_local``), σ = std(ε_l) per sample (unbiased,
      like ``torch.std``). By default σ is taken over ``eps_local`` itself, i.e. the 4 supervised
      channels; pass ``std_over`` = the raw 8-channel network output of the local branch to reproduce
      the reference, whose std also covers the 4 unsupervised channels (§7.3, §7.4). The reference
      ran with batch size 1 and one scalar std; per-sample std equals it there and keeps samples
      independent of their batch. σ is floored at 1e-12 so an all-zero ε_l cannot divide by zero.
    * ``global_pred`` (B, commented-out line): ε̃_l = (1 − α)·ε_g + α·ε_l, with ``eps_ref`` = ε_g,
      the *global path's* estimate (different latent x_g, full-CXR condition).
    * ``global_cond`` (C, "strict" form): ε̃_l = (1 − α)·ε_θ([x_l ; c_g]) + α·ε_θ([x_l ; c_l]), with
      ``eps_ref`` = ε_θ([x_l ; c_g]), the *local* latent under the global condition.

    B and C are written as (1 − α)·ref + α·ε_l (not ref + α·(ε_l − ref)) so that α = 0 returns the
    reference and α = 1 returns ε_l bit-exactly; at α = 1 ``eps_ref`` may be None (it is not used).

    Args:
        eps_local: (B, C, h, w) local-path estimate ε_θ([x_l ; c_l]).
        alpha: guidance weight α (3 in GL-LCM; 1 disables guidance).
        mode: one of :data:`LEG_MODES`.
        eps_ref: (B, C, h, w) reference estimate for ``global_pred`` / ``global_cond``.
        generator: source of ξ for ``noise`` (a generator, a list of B generators, or None for the
            global RNG).
        std_over: optional (B, C', h, w) tensor whose per-sample std is σ (``noise`` only).

    Returns:
        (B, C, h, w) guided estimate (``eps_local`` itself for ``none``).

    Raises:
        ValueError: unknown mode, missing or mis-shaped ``eps_ref``, mis-batched ``std_over``.
    """
    if mode not in LEG_MODES:
        raise ValueError(f"mode must be one of {LEG_MODES}, got {mode!r}")
    if mode == "none":
        return eps_local
    if mode == "noise":
        ref = eps_local if std_over is None else std_over
        if ref.shape[0] != eps_local.shape[0]:
            raise ValueError(f"std_over has batch {ref.shape[0]}, eps_local has {eps_local.shape[0]}")
        sigma = ref.flatten(1).std(dim=1).clamp_min(1e-12).to(eps_local.dtype)
        sigma = sigma.reshape(-1, *([1] * (eps_local.ndim - 1)))
        xi = randn(eps_local.shape, generator, eps_local.device, eps_local.dtype)
        return alpha * eps_local + (1.0 - alpha) * xi / sigma
    if alpha == 1:
        return eps_local
    if eps_ref is None:
        raise ValueError(f"LEG mode {mode!r} with alpha != 1 needs eps_ref")
    if eps_ref.shape != eps_local.shape:
        raise ValueError(f"eps_ref has shape {tuple(eps_ref.shape)}, eps_local {tuple(eps_local.shape)}")
    return (1.0 - alpha) * eps_ref + alpha * eps_local


# --------------------------------------------------------------------------------------------------
# Dual-path sampling (§5.1): a denoiser of the stacked batch, run by the one loop of models.samplers
# --------------------------------------------------------------------------------------------------

def dual_path_denoiser(unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                       cond_global: torch.Tensor, cond_local: torch.Tensor, cond_mode: str, leg_mode: str,
                       alpha: float, generators_local: Generators = None,
                       leg_std_channels: int = LATENT_CHANNELS, batched: bool = True) -> DenoiseFn:
    """Both paths as one ε-model of the stacked latent, LEG applied to the local half (§5.1, §5.2):

        denoise_fn(x (2B, 4, h, w) = [x_g ; x_l], t (2B,) long) -> (2B, 4, h, w) = [ε_g ; ε̃_l]

    with ε_g = ε_θ([x_g ; c_g]), ε_l = ε_θ([x_l ; c_l]) and ε̃_l = LEG(ε_l, α, ``leg_mode``, …) as in
    :func:`local_enhanced_guidance` (``global_pred`` uses ε_g; ``global_cond`` a third branch
    ε_θ([x_l ; c_g]), left out when α = 1, where LEG is the identity). Only the 4 target channels are
    returned (§7.4); the condition is re-attached at every call by
    :func:`models.schedule.model_input_sample` according to ``cond_mode`` (§3.5), which is what the
    reference's "reset the condition channels" achieved.

    Args:
        unet: ``unet(x (N, 8, h, w), t (N,) long) -> (N, C_out >= 4, h, w)``, e.g.
            :class:`models.unet.UNetModel` in eval mode.
        schedule: the noise schedule the model was trained with.
        cond_global, cond_local: (B, 4, h, w) latents c_g (full CXR) and c_l (lung-masked CXR).
        cond_mode: condition handling at sampling time (``clean``, ``bug_compatible``,
            ``scaled_consistent``).
        leg_mode, alpha: LEG mode (one of :data:`LEG_MODES`) and weight α.
        generators_local: source of LEG's ξ (``noise`` mode; one draw per call).
        leg_std_channels: ``noise`` mode: the leading output channels σ is taken over (8 = the
            reference's std over all outputs of an 8-output network).
        batched: one network call on the 2B (3B) batch, or one call of B per branch (same result up
            to float rounding of batched convolutions).

    Raises (when called):
        ValueError: the network returns fewer than 4 (or ``leg_std_channels``) channels.
    """
    b = cond_global.shape[0]
    # The third branch is only needed when it can change the result.
    conds = [cond_global, cond_local] + ([cond_global] if leg_mode == "global_cond" and alpha != 1 else [])
    need = max(LATENT_CHANNELS, leg_std_channels if leg_mode == "noise" else 0)

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        latents = [x[:b], x[b:], x[b:]][:len(conds)]         # the local latent feeds the third branch
        raw = _branch_outputs(unet, schedule, latents, conds, [t[:b], t[b:], t[b:]][:len(conds)], cond_mode,
                              batched)
        if raw[0].shape[1] < need:
            raise ValueError(f"network returned {raw[0].shape[1]} channels; need {LATENT_CHANNELS}"
                             + (f" and leg_std_channels={leg_std_channels}" if leg_mode == "noise" else ""))
        return torch.cat(_guided_pair(raw, leg_mode, alpha, generators_local, leg_std_channels))

    return denoise_fn


def _branch_outputs(unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                    latents: list[torch.Tensor], conds: list[torch.Tensor], ts: list[torch.Tensor],
                    cond_mode: str, batched: bool) -> list[torch.Tensor]:
    """Raw network outputs (B, C_out, h, w) of the branches [latents[i] ; conds[i]] at ts[i]
    (each (B, 4, h, w), (B, 4, h, w), (B,)): one call on their concatenation, or one per branch."""
    inputs = [model_input_sample(z, c, t, schedule, cond_mode) for z, c, t in zip(latents, conds, ts)]
    if not batched:
        return [unet(x_in, t) for x_in, t in zip(inputs, ts)]
    return list(unet(torch.cat(inputs), torch.cat(ts)).split(latents[0].shape[0]))


def _guided_pair(raw: list[torch.Tensor], leg_mode: str, alpha: float, generator: Generators,
                 leg_std_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε_g, ε̃_l), each (B, 4, h, w) float32, from the raw outputs of the 2 or 3 branches."""
    eps_g, eps_l = (r[:, :LATENT_CHANNELS].float() for r in raw[:2])
    eps_ref = eps_g if leg_mode == "global_pred" else (raw[2][:, :LATENT_CHANNELS].float()
                                                       if len(raw) == 3 else None)
    std_over = (raw[1][:, :leg_std_channels].float()
                if leg_mode == "noise" and leg_std_channels != LATENT_CHANNELS else None)
    return eps_g, local_enhanced_guidance(eps_l, alpha, leg_mode, eps_ref, generator, std_over)


@torch.no_grad()
def dual_path_sample(unet: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                     cond_global: torch.Tensor, cond_local: torch.Tensor, sampler_cfg, gl_cfg,
                     cond_mode: str, generators_global: Generators = None,
                     generators_local: Generators = None, x_T: torch.Tensor | None = None,
                     progress: bool = False, *, batched: bool = True,
                     leg_std_channels: int | None = None, callback: DualCallback | None = None,
                     original_steps: int = 50, sigma_data: float = 0.5,
                     timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GL-LCM dual-path sampling: global and local soft-tissue latents from one shared x_T (§5.1).

    One run of :func:`models.samplers.sample` on the stacked latent (grid of ``sampler_cfg.name`` /
    ``steps``, computed once here); per step j at timestep t:

        [ε_g ; ε̃_l] = dual_path_denoiser([x_g ; x_l], t)            # one network call, LEG inside
        [x_g ; x_l] ← step([ε_g ; ε̃_l], [x_g ; x_l], clip [r_g,j ; r_l,j],
                           BlockGenerators(generators_global, generators_local))

    i.e., element for element, x_g ← step(ε_g, x_g, r0_global + κ·j, generators_global) and then
    x_l ← step(ε̃_l, x_l, r0_local + κ·j, generators_local) (§4.3 ranges; ``sampler.clip_index``).

    Args:
        unet, schedule, cond_global, cond_local, cond_mode, batched: as :func:`dual_path_denoiser`
            (conditions (B, 4, h, w)).
        sampler_cfg: :class:`utils.config.SamplerConfig` (name, steps, eta, clip, clip_r0_global,
            clip_r0_local, clip_kappa, clip_off_by_one, clip_index).
        gl_cfg: :class:`utils.config.GlobalLocalConfig` (leg_mode, alpha; ``enabled`` and the fusion
            fields are the caller's business).
        generators_global: source of x_T (when not given) and of the global path's step noise; a
            generator, a list of B generators, or None (global RNG, unseeded like the reference).
        generators_local: source of LEG's ξ and of the local path's step noise (same forms).
        x_T: optional (B, 4, h, w) initial latent shared by both paths.
        progress: show a tqdm bar.
        leg_std_channels: LEG ``noise`` only: number of leading output channels over which σ is
            computed; 4 (the supervised channels) by default, 8 reproduces the reference's std over
            all 8 outputs of an 8-output network. None: ``gl_cfg.leg_std_channels`` if that field
            exists, else 4.
        callback: called as ``callback(j, t, out_global, out_local)`` after every step with the two
            :class:`models.samplers.StepOutput` (their ``pred_x0`` are the clipped x̂0).
        original_steps, sigma_data, timestep_scaling: LCM grid size and boundary scalings.

    Returns:
        ``(z_global, z_local)``, each (B, 4, h, w) float32 (the network's output dtype is cast).

    Raises:
        ValueError: mismatched conditions or x_T, unknown LEG mode or sampler, too few output
            channels for ``leg_std_channels``.
    """
    mode, alpha = gl_cfg.leg_mode, float(gl_cfg.alpha)
    leg_std_channels = _checked_leg_settings(cond_global, cond_local, gl_cfg, leg_std_channels)
    b, _, h, w = cond_global.shape
    device = cond_global.device
    timesteps = sampler_grid(sampler_cfg, schedule, original_steps)      # the run's one grid
    path_ranges = [tat_ranges(sampler_cfg, r0, schedule.num_train_timesteps, original_steps, timesteps)
                   for r0 in (sampler_cfg.clip_r0_global, sampler_cfg.clip_r0_local)]
    if x_T is None:
        x_T = randn((b, LATENT_CHANNELS, h, w), generators_global, device)
    elif tuple(x_T.shape) != (b, LATENT_CHANNELS, h, w):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {(b, LATENT_CHANNELS, h, w)}")
    # Both paths start from the same x_T (§5.1).
    x_T = x_T.to(device=device, dtype=torch.float32).repeat(2, 1, 1, 1)
    denoise_fn = dual_path_denoiser(unet, schedule, cond_global, cond_local, cond_mode, mode, alpha,
                                    generators_local, leg_std_channels, batched)
    z = sample(denoise_fn, schedule, tuple(x_T.shape), sampler_cfg.name,
               clip_ranges=block_clip_ranges(path_ranges, b, x_T.dtype, device),
               generator=BlockGenerators((generators_global, generators_local)), eta=sampler_cfg.eta,
               x_T=x_T, progress=progress, original_steps=original_steps, sigma_data=sigma_data,
               timestep_scaling=timestep_scaling, timesteps=timesteps,
               callback=None if callback is None else _per_path(callback, b))
    return z[:b], z[b:]


def _checked_leg_settings(cond_global: torch.Tensor, cond_local: torch.Tensor, gl_cfg,
                          leg_std_channels: int | None) -> int:
    """Check the LEG mode and the conditions' shapes; returns ``leg_std_channels`` with its default."""
    if gl_cfg.leg_mode not in LEG_MODES:
        raise ValueError(f"gl_cfg.leg_mode must be one of {LEG_MODES}, got {gl_cfg.leg_mode!r}")
    if cond_global.ndim != 4 or cond_global.shape != cond_local.shape:
        raise ValueError(f"cond_global {tuple(cond_global.shape)} and cond_local {tuple(cond_local.shape)} "
                         "must be equal (B, C, h, w) shapes")
    if leg_std_channels is None:
        leg_std_channels = int(gl_cfg.leg_std_channels)
    if leg_std_channels < 1:
        raise ValueError(f"leg_std_channels must be >= 1, got {leg_std_channels}")
    return leg_std_channels


def _per_path(callback: DualCallback, b: int) -> Callable[[int, int, StepOutput], None]:
    """The loop's ``callback(j, t, out)`` on the stacked batch (2B) as ``callback(j, t, out_g, out_l)``."""
    def split(j: int, t: int, out: StepOutput) -> None:
        (g, l), (g0, l0) = out.prev_sample.split(b), out.pred_x0.split(b)
        callback(j, t, StepOutput(g, g0), StepOutput(l, l0))

    return split

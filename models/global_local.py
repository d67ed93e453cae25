"""GL-LCM global-local dual-path sampling with Local-Enhanced Guidance (method.md §5.1, §5.2).

Two latent paths are sampled side by side with the same conditional ε-model:

* the **global** path, conditioned on the whole CXR latent c_g = VQ(CXR);
* the **local** path, conditioned on the lung-masked CXR latent c_l = VQ(Masked_CXR), whose noise
  estimate is modified by Local-Enhanced Guidance (LEG) before its sampler step.

Both paths start from the *same* initial noise x_T; afterwards they share nothing but the timestep
grid: each has its own temporal-adaptive-thresholding clip ranges r_j = r0 + κ·j (r0 = clip_r0_global
or clip_r0_local, the same κ, §4.3) and draws its re-noising noise from its own generator(s), so the
global path is exactly the single-path sampler of :func:`models.samplers.sample` and does not depend
on anything the local path does. Decoding and pixel-space fusion live in :mod:`models.fusion`.

Cost. Every step is ONE network call on the concatenated batch [x_g ; c_g] + [x_l ; c_l] (2B), or
3B for ``global_cond`` LEG, which adds [x_l ; c_g] (§9: one batch-2 call is ~1.26x cheaper than two
calls on a CPU). ``batched=False`` makes separate calls per branch instead; it exists to test the
batched path and for memory-bound devices.

Random draws, in this order within step j (only the order *per generator* matters):

1. (before step 0, only when ``x_T`` is None) x_T from ``generators_global``;
2. LEG ξ_j (mode ``noise`` only) from ``generators_local``, even when α = 1, so that the local
   stream has the same layout for every α;
3. the global path's step noise from ``generators_global`` (none on the last step);
4. the local path's step noise from ``generators_local`` (none on the last step).

This is the reference's order (``randn_like`` for LEG, then the global step, then the local step) with
per-path generators instead of the unseeded global RNG (§7.20). A list of B generators per path makes
every batch element's sample independent of the batch it is computed in (LEG's std is per sample too).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from models.inference import LATENT_CHANNELS, tat_ranges
from models.samplers import StepOutput, sample_timesteps, sampler_step
from models.schedule import NoiseSchedule, model_input_sample, randn

__all__ = ["LEG_MODES", "local_enhanced_guidance", "dual_path_sample", "sequential_dual_path_sample"]

LEG_MODES = ("none", "noise", "global_pred", "global_cond")

Generators = torch.Generator | Sequence[torch.Generator] | None
DualCallback = Callable[[int, int, StepOutput, StepOutput], None]


# --------------------------------------------------------------------------------------------------
# Local-Enhanced Guidance (§5.2)
# --------------------------------------------------------------------------------------------------

def local_enhanced_guidance(eps_local: torch.Tensor, alpha: float, mode: str,
                            eps_ref: torch.Tensor | None = None, generator: Generators = None,
                            std_over: torch.Tensor | None = None) -> torch.Tensor:
    """Guided local-path noise estimate ε̃_l (method.md §5.2, §7.3).

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
# Dual-path sampling (§5.1)
# --------------------------------------------------------------------------------------------------

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

    Per step j at timestep t (grid of ``sampler_cfg.name`` / ``steps``, as in
    :func:`models.samplers.sample`):

        raw = unet([x_g ; c_g] ‖ [x_l ; c_l] (‖ [x_l ; c_g] for global_cond), t)   # one call
        ε_g, ε_l (, ε_ref) = raw[:, :4] split per branch
        ε̃_l = LEG(ε_l, α, leg_mode, ...)                     (see local_enhanced_guidance)
        x_g ← step(ε_g, x_g, clip r0_global + κ·j, generators_global)
        x_l ← step(ε̃_l, x_l, clip r0_local + κ·j, generators_local)

    Only the 4 target channels are stepped (§7.4); the condition is re-attached at every call by
    :func:`models.schedule.model_input_sample` according to ``cond_mode`` (§3.5), which is what the
    reference's "reset the condition channels" achieved. The ``global_cond`` reference branch is
    skipped when α = 1 (LEG is then the identity).

    Args:
        unet: ``unet(x (N, 8, h, w), t (N,) long) -> (N, C_out >= 4, h, w)``, e.g.
            :class:`models.unet.UNetModel` in eval mode.
        schedule: the noise schedule the model was trained with.
        cond_global: (B, 4, h, w) latent of the full CXR, c_g.
        cond_local: (B, 4, h, w) latent of the lung-masked CXR, c_l.
        sampler_cfg: :class:`utils.config.SamplerConfig` (name, steps, eta, clip, clip_r0_global,
            clip_r0_local, clip_kappa, clip_off_by_one).
        gl_cfg: :class:`utils.config.GlobalLocalConfig` (leg_mode, alpha; ``enabled`` and the fusion
            fields are the caller's business).
        cond_mode: condition handling at sampling time (``clean``, ``bug_compatible``,
            ``scaled_consistent``).
        generators_global: source of x_T (when not given) and of the global path's step noise; a
            generator, a list of B generators, or None (global RNG, unseeded like the reference).
        generators_local: source of LEG's ξ and of the local path's step noise (same forms).
        x_T: optional (B, 4, h, w) initial latent shared by both paths.
        progress: show a tqdm bar.
        batched: one network call per step (default) or one per branch (same result up to float
            rounding of batched convolutions).
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
    if mode not in LEG_MODES:
        raise ValueError(f"gl_cfg.leg_mode must be one of {LEG_MODES}, got {mode!r}")
    if cond_global.ndim != 4 or cond_global.shape != cond_local.shape:
        raise ValueError(f"cond_global {tuple(cond_global.shape)} and cond_local {tuple(cond_local.shape)} "
                         "must be equal (B, C, h, w) shapes")
    if leg_std_channels is None:
        leg_std_channels = int(getattr(gl_cfg, "leg_std_channels", LATENT_CHANNELS))
    if leg_std_channels < 1:
        raise ValueError(f"leg_std_channels must be >= 1, got {leg_std_channels}")
    b, _, h, w = cond_global.shape
    shape = (b, LATENT_CHANNELS, h, w)
    device = cond_global.device

    timesteps = sample_timesteps(sampler_cfg.name, sampler_cfg.steps, schedule.num_train_timesteps,
                                 original_steps)
    n = len(timesteps)
    T = schedule.num_train_timesteps
    ranges_g = tat_ranges(sampler_cfg, sampler_cfg.clip_r0_global, T, original_steps) or [None] * n
    ranges_l = tat_ranges(sampler_cfg, sampler_cfg.clip_r0_local, T, original_steps) or [None] * n

    if x_T is None:
        x_T = randn(shape, generators_global, device)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    # Both paths start from the same x_T (§5.1); the steps never modify their input in place.
    x_g = x_l = x_T.to(device=device, dtype=torch.float32)

    # The third branch is only needed when it can change the result.
    n_branches = 3 if (mode == "global_cond" and alpha != 1) else 2
    conds = [cond_global, cond_local, cond_global][:n_branches]
    # All timestep tensors once, not per step: (n, n_branches·B) for the batched call.
    t_all = torch.tensor(timesteps, dtype=torch.long, device=device)[:, None].expand(n, n_branches * b)

    def network(x_global: torch.Tensor, x_local: torch.Tensor, j: int) -> list[torch.Tensor]:
        """Raw outputs of the n_branches branches, each (B, C_out, h, w)."""
        latents = [x_global, x_local, x_local][:n_branches]
        if batched:
            t = t_all[j]
            x_in = torch.cat([model_input_sample(x, c, t[:b], schedule, cond_mode)
                              for x, c in zip(latents, conds)])
            return list(unet(x_in, t).split(b))
        t = t_all[j, :b]
        return [unet(model_input_sample(x, c, t, schedule, cond_mode), t) for x, c in zip(latents, conds)]

    iterator = range(n)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"dual-path {sampler_cfg.name} x{n}", leave=False)
    for j in iterator:
        t = timesteps[j]
        t_next = timesteps[j + 1] if j + 1 < n else None
        raw = network(x_g, x_l, j)
        if raw[0].shape[1] < max(LATENT_CHANNELS, leg_std_channels if mode == "noise" else 0):
            raise ValueError(f"network returned {raw[0].shape[1]} channels; need {LATENT_CHANNELS}"
                             + (f" and leg_std_channels={leg_std_channels}" if mode == "noise" else ""))
        eps_g, eps_l = (r[:, :LATENT_CHANNELS].float() for r in raw[:2])
        eps_ref = eps_g if mode == "global_pred" else (raw[2][:, :LATENT_CHANNELS].float()
                                                        if n_branches == 3 else None)
        std_over = (raw[1][:, :leg_std_channels].float()
                    if mode == "noise" and leg_std_channels != LATENT_CHANNELS else None)
        eps_l = local_enhanced_guidance(eps_l, alpha, mode, eps_ref, generators_local, std_over)
        out_g = sampler_step(sampler_cfg.name, schedule, eps_g, t, t_next, x_g, ranges_g[j],
                              generators_global, sampler_cfg.eta, sigma_data, timestep_scaling)
        out_l = sampler_step(sampler_cfg.name, schedule, eps_l, t, t_next, x_l, ranges_l[j],
                              generators_local, sampler_cfg.eta, sigma_data, timestep_scaling)
        x_g, x_l = out_g.prev_sample, out_l.prev_sample
        if callback is not None:
            callback(j, t, out_g, out_l)
    return x_g, x_l


def sequential_dual_path_sample(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dual_path_sample` with one network call per branch (``batched=False``); same arguments."""
    return dual_path_sample(*args, batched=False, **kwargs)

"""Variance-preserving noise schedule, offset noise, condition handling, prediction targets and the
training loss (docs/method.md §3.3, §3.5).

``NoiseSchedule`` owns the betas and ᾱ_t (``alphas_cumprod``) and the closed-form maps between x0,
ε and x_t. It knows nothing about networks or samplers.

    add_noise:   x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε
    predict_x0:  x̂0  = (x_t − √(1−ᾱ_t) · ε̂) / √ᾱ_t
    predict_eps: ε̂   = (x_t − √ᾱ_t · x̂0) / √(1−ᾱ_t)
    v_target:    v   = √ᾱ_t · ε − √(1−ᾱ_t) · x0          (Salimans & Ho 2022)
    eps_from_v:  ε̂   = √(1−ᾱ_t) · x_t + √ᾱ_t · v̂

Prediction types (``diffusion.prediction``). BS-LDM / GL-LCM predict ε (``epsilon``, the default and
the paper configs). ``v`` is an option of this project: with ε-prediction x̂0 = (x_t − √(1−ᾱ)ε̂)/√ᾱ
multiplies any ε error by √((1−ᾱ)/ᾱ) ≈ 15 at t = 999 of the scaled-linear schedule, and the ε-loss
barely weights those timesteps, so a briefly trained model gets x̂0 (and the image brightness) of
the first sampling steps wrong; v-prediction bounds the x̂0 error by the v error at every t.
:func:`eps_model` turns either network into the ε-model the samplers, the guidance and the
distillation work with, so nothing downstream depends on the prediction type.

The schedule is computed in float64 (diffusers computes it in float32; the relative difference in
ᾱ_t is < 1e-5, far below anything a trained model resolves) and gathered in the dtype of the tensor
it is applied to.

Condition modes (§3.5). The reference noises the 8-channel tensor [z_target ; z_cond] with noise
[ε ; 0], so the network is *trained* on √ᾱ_t·c but *sampled* with the clean c:

    mode               training input          sampling input
    clean              [x_t ; c]               [x_t ; c]            (default for new training)
    bug_compatible     [x_t ; √ᾱ_t·c]          [x_t ; c]            (reproduces the published models)
    scaled_consistent  [x_t ; √ᾱ_t·c]          [x_t ; √ᾱ_t·c]       (ablation)
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from utils.config import DiffusionConfig

__all__ = ["NoiseSchedule", "build_schedule", "randn", "offset_noise", "COND_MODES", "PREDICTION_TYPES",
           "model_input_train", "model_input_sample", "training_loss", "EpsFromV", "eps_model"]

BETA_SCHEDULES = ("scaled_linear", "cosine", "linear")
COND_MODES = ("clean", "bug_compatible", "scaled_consistent")
PREDICTION_TYPES = ("epsilon", "v")


# --------------------------------------------------------------------------------------------------
# Random numbers
# --------------------------------------------------------------------------------------------------

def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | Sequence[torch.Generator] | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal tensor drawn from ``generator`` and returned on ``device``.

    The numbers are drawn on the generator's own device (a CPU generator can drive a CUDA run), so
    a given seed gives the same numbers whatever ``device`` is, as long as the generator's device
    is the same. ``generator`` may also be a list with one generator per batch element (``shape[0]``
    of them): each element's noise then depends only on its own generator, so a sample does not
    change with the batch it is computed in.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.stack([randn(tuple(shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


def offset_noise(shape: tuple[int, ...] | torch.Size, coefficient: float,
                 generator: torch.Generator | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Offset noise ε_off = ε + c·δ (docs/method.md §3.3).

    ε ~ N(0, I) has the full ``shape`` (B, C, H, W); δ ~ N(0, I) has shape (B, C, 1, 1), i.e. one
    constant per sample and channel, which lets the model learn to shift the mean brightness of a
    latent channel. ε is drawn first, then δ; with ``coefficient == 0`` δ is not drawn at all, so the
    result equals plain ``randn`` with the same generator.

    Returns:
        (B, C, H, W) tensor; per-channel spatial means have variance 1/(H·W) + c².
    """
    eps = randn(shape, generator, device, dtype)
    if coefficient == 0:
        return eps
    delta = randn((shape[0], shape[1], 1, 1), generator, device, dtype)
    return eps + coefficient * delta


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------

def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol-Dhariwal cosine schedule (diffusers ``squaredcos_cap_v2``):
    ᾱ(s) = cos²(((s + 0.008)/1.008)·π/2), β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), max_beta)."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return torch.tensor([min(1 - alpha_bar((t + 1) / T) / alpha_bar(t / T), max_beta) for t in range(T)],
                        dtype=torch.float64)


class NoiseSchedule:
    """Discrete variance-preserving schedule with T training timesteps (t = 0..T−1).

    Args:
        num_train_timesteps: T (1000).
        beta_schedule: ``"scaled_linear"`` (GL-LCM / Stable Diffusion: β_t = linspace(√β_start,
            √β_end, T)²), ``"cosine"`` (BS-LDM, ``squaredcos_cap_v2``; β_start/β_end ignored, max β
            0.999) or ``"linear"`` (β_t = linspace(β_start, β_end, T)).
        beta_start, beta_end: end points of the (scaled-)linear schedules.

    Attributes (float64, CPU, shape (T,)): ``betas``, ``alphas`` (1 − β), ``alphas_cumprod`` (ᾱ_t),
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``.

    Golden values (T = 1000): ᾱ_999 = 0.004660 (scaled-linear 0.00085→0.012), 2.43e-9 (cosine).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "scaled_linear",
                 beta_start: float = 0.00085, beta_end: float = 0.012) -> None:
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if beta_schedule != "cosine" and not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        T = num_train_timesteps
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        else:
            betas = _cosine_betas(T)
        self.num_train_timesteps = T
        self.beta_schedule = beta_schedule
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.num_train_timesteps}, beta_schedule={self.beta_schedule!r})"

    # -- scalar look-ups (samplers step the whole batch at one integer t)

    def alpha_cumprod(self, t: int) -> float:
        """ᾱ_t as a Python float; t = −1 gives 1 (the "previous" timestep of the last DDPM/DDIM step)."""
        if t < 0:
            return 1.0
        return float(self.alphas_cumprod[t])

    # -- per-sample gathers

    def _gather(self, name: str, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``getattr(self, name)[t]`` in ``like``'s dtype/device, shaped (B, 1, 1, 1) to broadcast."""
        key = (name, like.device, like.dtype)
        table = self._cache.get(key)
        if table is None:  # one host->device copy per (table, device, dtype), not per call
            table = self._cache[key] = getattr(self, name).to(device=like.device, dtype=like.dtype)
        t = torch.as_tensor(t, device=like.device, dtype=torch.long)
        if t.ndim == 0:
            t = t.expand(like.shape[0])
        return table[t].reshape(-1, *([1] * (like.ndim - 1)))

    def sqrt_alpha_bar(self, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """√ᾱ_t as a (B, 1, 1, 1) tensor broadcastable to ``like``."""
        return self._gather("sqrt_alphas_cumprod", t, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """Forward process q(x_t | x0): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise.

        Args:
            x0: (B, C, H, W) clean latent.
            noise: (B, C, H, W) noise (plain or offset).
            t: (B,) long timesteps in [0, T), or one int for the batch.
        """
        return (self._gather("sqrt_alphas_cumprod", t, x0) * x0
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t; shapes as in :meth:`add_noise`."""
        return ((x_t - self._gather("sqrt_one_minus_alphas_cumprod", t, x_t) * eps)
                / self._gather("sqrt_alphas_cumprod", t, x_t))

    def predict_eps(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε̂ = (x_t − √ᾱ_t·x̂0) / √(1−ᾱ_t); shapes as in :meth:`add_noise`."""
        return ((x_t - self._gather("sqrt_alphas_cumprod", t, x_t) * x0)
                / self._gather("sqrt_one_minus_alphas_cumprod", t, x_t))

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """v = √ᾱ_t·noise − √(1−ᾱ_t)·x0, the v-prediction target; shapes as in :meth:`add_noise`."""
        return (self._gather("sqrt_alphas_cumprod", t, x0) * noise
                - self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * x0)

    def eps_from_v(self, x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """ε̂ = √(1−ᾱ_t)·x_t + √ᾱ_t·v̂ (exact inverse of :meth:`v_target` given x_t); shapes as above."""
        return (self._gather("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
                + self._gather("sqrt_alphas_cumprod", t, x_t) * v)


def build_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """Noise schedule from the ``diffusion`` config section."""
    return NoiseSchedule(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)


# --------------------------------------------------------------------------------------------------
# Condition handling (§3.5)
# --------------------------------------------------------------------------------------------------

def _check_mode(cond_mode: str) -> None:
    if cond_mode not in COND_MODES:
        raise ValueError(f"cond_mode must be one of {COND_MODES}, got {cond_mode!r}")


def model_input_train(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor | int,
                      schedule: NoiseSchedule, cond_mode: str = "clean") -> torch.Tensor:
    """Network input during training: [x_t ; c] (``clean``) or [x_t ; √ᾱ_t·c] (``bug_compatible``,
    ``scaled_consistent``: what the reference's 8-channel ``add_noise`` with zero condition noise gives).

    Shapes: x_t (B, 4, h, w), cond (B, 4, h, w), t (B,) -> (B, 8, h, w).
    """
    _check_mode(cond_mode)
    if cond_mode != "clean":
        cond = schedule.sqrt_alpha_bar(t, cond) * cond
    return torch.cat([x_t, cond], dim=1)


def model_input_sample(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor | int,
                       schedule: NoiseSchedule, cond_mode: str = "clean") -> torch.Tensor:
    """Network input during sampling: [x_t ; c] (``clean``, and ``bug_compatible`` exactly as the
    authors sample) or [x_t ; √ᾱ_t·c] (``scaled_consistent``, matching its training input).

    Shapes: x_t (B, 4, h, w), cond (B, 4, h, w), t (B,) or int -> (B, 8, h, w).
    """
    _check_mode(cond_mode)
    if cond_mode == "scaled_consistent":
        cond = schedule.sqrt_alpha_bar(t, cond) * cond
    return torch.cat([x_t, cond], dim=1)


# --------------------------------------------------------------------------------------------------
# Training objective (§3.3)
# --------------------------------------------------------------------------------------------------

def training_loss(model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: NoiseSchedule,
                  z_target: torch.Tensor, z_cond: torch.Tensor, cfg: DiffusionConfig,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ε- (or v-) prediction MSE with offset noise, shared by training and validation.

    t ~ U{0, …, T−1} is drawn once per sample with the *actual* batch size (the reference used the
    configured batch size, which crashes or broadcasts on a partial last batch, §7.5). The offset
    noise ε_off (coefficient ``cfg.offset_noise``) is added to the target channels only; the
    condition enters according to ``cfg.cond_mode``. The loss is MSE(out[:, :C], target), C =
    z_target's channels, so it works for a network with 4 or 8 output channels (the extra ones are
    unsupervised, as in the reference); the target is ε_off (``cfg.prediction == "epsilon"``, the
    reference) or v = √ᾱ_t·ε_off − √(1−ᾱ_t)·z_target (``"v"``).

    Args:
        model: ``model(x (B, C + C_cond, h, w), t (B,) long) -> (B, >= C, h, w)``, the raw network.
        schedule: the noise schedule.
        z_target: (B, C, h, w) clean target (soft-tissue) latent.
        z_cond: (B, C_cond, h, w) condition (CXR) latent.
        cfg: the ``diffusion`` config (offset_noise, cond_mode, prediction).
        generator: optional; t is drawn first, then ε, then δ.

    Returns:
        ``(loss, logs)``: scalar loss (fp32) and plain floats ``{"loss", "t_mean"}``.
    """
    _check_prediction(cfg.prediction)
    b, c = z_target.shape[:2]
    device = z_target.device
    draw_device = generator.device if generator is not None else device
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator, device=draw_device).to(device)
    noise = offset_noise(z_target.shape, cfg.offset_noise, generator, device, z_target.dtype)
    x_t = schedule.add_noise(z_target, noise, t)
    out = model(model_input_train(x_t, z_cond, t, schedule, cfg.cond_mode), t)
    if out.shape[1] < c:
        raise ValueError(f"model returned {out.shape[1]} channels, need at least {c}")
    target = noise if cfg.prediction == "epsilon" else schedule.v_target(z_target, noise, t)
    loss = F.mse_loss(out[:, :c].float(), target.float())
    return loss, {"loss": loss.item(), "t_mean": t.float().mean().item()}


# --------------------------------------------------------------------------------------------------
# Prediction types
# --------------------------------------------------------------------------------------------------

def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")


class EpsFromV(torch.nn.Module):
    """A v-prediction network seen as an ε-prediction network (no parameters of its own).

    ``forward(x (B, C + C_cond, h, w), t (B,))``: runs ``net`` and replaces its first C output
    channels v̂ by ε̂ = √(1−ᾱ_t)·x_t + √ᾱ_t·v̂, with x_t = x[:, :C]; any further output channels are
    passed through unchanged. C = ``channels`` (4, the supervised latent channels).
    """

    def __init__(self, net: torch.nn.Module, schedule: NoiseSchedule, channels: int = 4):
        super().__init__()
        self.net, self.schedule, self.channels = net, schedule, channels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t)
        c = self.channels
        eps = self.schedule.eps_from_v(x[:, :c].to(out.dtype), out[:, :c], t)
        return torch.cat([eps, out[:, c:]], dim=1) if out.shape[1] > c else eps


def eps_model(net: torch.nn.Module, schedule: NoiseSchedule, prediction: str = "epsilon",
              channels: int = 4) -> torch.nn.Module:
    """``net`` itself for ``epsilon``; :class:`EpsFromV` around it for ``v``."""
    _check_prediction(prediction)
    return net if prediction == "epsilon" else EpsFromV(net, schedule, channels)

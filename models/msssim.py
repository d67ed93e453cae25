"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) as used by GL-LCM's VQGAN loss (docs/method.md §2.3).

Matches the vendored ``pytorch_msssim.py`` of the reference (jorge-pessoa version, ``normalize="relu"``),
written from the specification:

* Gaussian window 11, sigma 1.5, **valid** convolution (no padding), per channel;
* 5 scales weighted (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x2 average pooling between scales;
* per scale: ssim_s = mean(SSIM map), cs_s = mean(contrast-structure map), both clamped at 0 (relu);
* output = prod_{s=1..4} cs_s^{w_s} * ssim_5^{w_5};
* C1 = (0.01 L)^2, C2 = (0.03 L)^2.

Differences from the reference, both deliberate:

* The dynamic range L is fixed at construction (``data_range=2`` for [-1, 1] images). The reference
  guessed L from the first image on every call (docs/method.md §7.13); ``data_range=None`` reproduces that
  guess for bit-compatibility.
* The window is built once and kept as a buffer instead of being rebuilt on every call.

Small inputs: like the reference, a scale smaller than the window uses a window of size
min(11, h, w) (renormalised Gaussian, same sigma). Full-size windows at all 5 scales need sides
>= 11 * 16 = 176 px; the project's 1024 px images never hit the fallback, but smoke tests at 32-64 px
do. Sides below 16 px would leave an empty last scale and raise ValueError.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MSSSIM", "MSSSIM_WEIGHTS", "gaussian_window", "ssim_components", "guess_data_range"]

MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 2-D Gaussian (size, size), the outer product of a 1-D Gaussian centred at size // 2."""
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-x.pow(2) / (2.0 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def guess_data_range(x: torch.Tensor) -> float:
    """The reference's per-call guess of L: (255 if max > 128 else 1) - (-1 if min < -0.5 else 0)."""
    max_val = 255.0 if float(x.max()) > 128 else 1.0
    min_val = -1.0 if float(x.min()) < -0.5 else 0.0
    return max_val - min_val


def ssim_components(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: float,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-scale SSIM and contrast-structure maps with valid padding.

    Args:
        x, y: (B, C, H, W) images.
        window: (k, k) normalised, separable window (an outer product g gᵀ), k <= min(H, W).
        data_range: L.
    Returns:
        ssim_map, cs_map: (B, C, H - k + 1, W - k + 1).
    """
    c = x.shape[1]
    # The Gaussian window is the outer product g gᵀ (its row sums are g), so one horizontal and one
    # vertical 1-D pass give the same valid-padded blur with 2k instead of k² taps; the five moments
    # are blurred in one grouped convolution.
    g = window.sum(dim=1).to(dtype=x.dtype, device=x.device)
    k = g.numel()
    stacked = torch.cat([x, y, x * x, y * y, x * y], dim=1)             # (B, 5C, H, W)
    blurred = F.conv2d(stacked, g.view(1, 1, 1, k).expand(5 * c, 1, 1, k), groups=5 * c)
    blurred = F.conv2d(blurred, g.view(1, 1, k, 1).expand(5 * c, 1, k, 1), groups=5 * c)
    mu_x, mu_y, e_xx, e_yy, e_xy = blurred.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = e_xx - mu_xx
    var_y = e_yy - mu_yy
    cov = e_xy - mu_xy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    cs_map = (2.0 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2.0 * mu_xy + c1) / (mu_xx + mu_yy + c1) * cs_map
    return ssim_map, cs_map


class MSSSIM(nn.Module):
    """MS-SSIM between two image batches; build once, call many times.

    Args:
        data_range: L, the value range of the images (2.0 for [-1, 1]); None guesses it from the
            first argument on every call, as the reference did.
        window_size, sigma: Gaussian window (11, 1.5).
        weights: per-scale exponents; their number sets the number of scales (5).
        reduction: "mean" pools ssim / cs over the whole batch at each scale before combining the
            scales (the reference's ``size_average=True``, used by the loss); "none" returns one
            value per image (B,).

    forward(x, y): x, y (B, C, H, W), min(H, W) >= 2 ** (scales - 1). Returns a scalar (or (B,)),
    1 for identical images. Computed in float32 with autocast off (the variance terms
    E[x^2] - E[x]^2 cancel badly in half precision).
    """

    def __init__(self, data_range: float | None = 2.0, window_size: int = 11, sigma: float = 1.5,
                 weights: tuple[float, ...] = MSSSIM_WEIGHTS, reduction: str = "mean") -> None:
        super().__init__()
        if data_range is not None and not data_range > 0:
            raise ValueError(f"data_range must be > 0 or None, got {data_range!r}")
        if window_size < 1 or not sigma > 0:
            raise ValueError("window_size must be >= 1 and sigma > 0")
        if len(weights) < 1:
            raise ValueError("weights must have at least one entry")
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        self.data_range = data_range
        self.window_size = window_size
        self.sigma = sigma
        self.reduction = reduction
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.register_buffer("window", gaussian_window(window_size, sigma), persistent=False)

    def extra_repr(self) -> str:
        return (f"data_range={self.data_range}, window_size={self.window_size}, sigma={self.sigma}, "
                f"scales={self.weights.numel()}, reduction={self.reduction!r}")

    def _window_for(self, h: int, w: int) -> torch.Tensor:
        size = min(self.window_size, h, w)
        return self.window if size == self.window_size else gaussian_window(size, self.sigma)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4:
            raise ValueError(f"expected two (B, C, H, W) tensors of the same shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        scales = self.weights.numel()
        min_side = 2 ** (scales - 1)
        if min(x.shape[-2:]) < min_side:
            raise ValueError(f"MS-SSIM with {scales} scales needs images of at least {min_side} px per "
                             f"side (full {self.window_size}-px windows need {self.window_size * min_side}), "
                             f"got {tuple(x.shape[-2:])}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = x.float(), y.float()
            data_range = guess_data_range(x) if self.data_range is None else self.data_range
            ssims, css = [], []
            for s in range(scales):
                if s > 0:
                    x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
                ssim_map, cs_map = ssim_components(x, y, self._window_for(*x.shape[-2:]), data_range)
                dims = (1, 2, 3) if self.reduction == "none" else (0, 1, 2, 3)
                ssims.append(F.relu(ssim_map.mean(dims)))
                css.append(F.relu(cs_map.mean(dims)))
            # Contrast-structure at scales 1..S-1, full SSIM at the coarsest scale only; same order
            # of operations as the reference (product of the cs powers, then times the ssim power).
            out = ssims[-1] ** self.weights[-1]
            if scales > 1:
                cs = torch.stack(css[:-1])                                   # (S-1,) or (S-1, B)
                w = self.weights[:-1].view(-1, *[1] * (cs.dim() - 1))
                out = torch.prod(cs ** w, dim=0) * out
        return out

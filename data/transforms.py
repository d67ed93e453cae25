"""Intensity and size transforms between image files and model tensors.

Model space is the reference's: a (1, S, S) float tensor in [-1, 1] (x = 2p - 1 for pixels p in
[0, 1], §1.2). Resizing is bilinear with half-pixel centres and no antialiasing, like OpenCV's
``cv.resize`` default that the reference used; the original size is kept so that a prediction can
be brought back to the size of the file it came from.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_model(pixels: np.ndarray | torch.Tensor, invert: bool = False) -> torch.Tensor:
    """[0, 1] pixels (H, W) -> model tensor (1, H, W) in [-1, 1].

    Args:
        invert: take the negative first (I' = 1 - I), as GL-LCM/BS-LDM did for JSRT (§1.1).
    """
    x = torch.as_tensor(np.asarray(pixels, dtype=np.float32) if not torch.is_tensor(pixels) else pixels)
    x = x.float()
    if x.ndim == 2:
        x = x[None]
    if invert:
        x = 1.0 - x
    return x * 2.0 - 1.0


def from_model(x: torch.Tensor, invert: bool = False) -> np.ndarray:
    """Model tensor (..., H, W) in [-1, 1] -> float32 numpy [0, 1] (clipped), undoing ``invert``."""
    p = (x.detach().float().cpu() * 0.5 + 0.5).clamp(0.0, 1.0)
    if invert:
        p = 1.0 - p
    return p.numpy()


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize (C, H, W) or (B, C, H, W) to ``size`` (int = square).

    ``mode="bilinear"``: OpenCV INTER_LINEAR semantics (half-pixel centres, no antialias);
    ``mode="nearest"`` for masks. Returns ``x`` itself when the size already matches.
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == hw:
        return x
    batched = x.ndim == 4
    y = x if batched else x[None]
    if mode == "bilinear":
        y = F.interpolate(y.float(), size=hw, mode="bilinear", align_corners=False, antialias=False)
    elif mode == "nearest":
        y = F.interpolate(y.float(), size=hw, mode="nearest-exact")
    else:
        raise ValueError(f"unknown resize mode {mode!r}")
    return y if batched else y[0]

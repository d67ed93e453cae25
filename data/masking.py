"""Lung masks and the lung-masked image copies of GL-LCM's data preparation (method.md §1.4).

One binarisation everywhere: a mask pixel is lung when its value is above half scale (> 127 in an
8-bit file). The reference used > 128 when masking and == 255 when fusing (§7.19); for the 0/255
masks this project writes, all three agree.
"""
from __future__ import annotations

import numpy as np

MASK_THRESHOLD = 0.5  # on [0, 1] pixels


def binarize_mask(pixels: np.ndarray) -> np.ndarray:
    """[0, 1] mask image (H, W) -> bool (H, W)."""
    return np.asarray(pixels) > MASK_THRESHOLD


def masked_copy(pixels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """GL-LCM's Masked_CXR / Masked_BS image: min-max stretch to [0, 1], then zero outside the lungs.

    Args:
        pixels: float (H, W) in [0, 1].
        mask: bool (H, W), same size (resize the mask first if needed).
    Returns:
        float32 (H, W) in [0, 1].
    """
    if pixels.shape != mask.shape:
        raise ValueError(f"image of shape {pixels.shape} and mask of shape {mask.shape} differ")
    lo, hi = float(pixels.min()), float(pixels.max())
    stretched = (pixels - lo) / (hi - lo) if hi > lo else np.zeros_like(pixels)
    return np.where(mask, stretched, 0.0).astype(np.float32)

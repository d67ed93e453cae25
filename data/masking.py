"""Lung masks and the lung-masked image copies of GL-LCM's data preparation (docs/method.md §1.4).

One binarisation everywhere: a mask pixel is lung when its value is above half scale (> 127 in an
8-bit file). The reference used > 128 when masking and == 255 when fusing (§7.19); for the 0/255
masks this project writes, all three agree.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data.io import ImageError, read_image

MASK_THRESHOLD = 0.5  # on [0, 1] pixels


def binarize_mask(mask: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """(H, W) lung mask -> bool (H, W): the project's one binarisation, for segmentation, training
    data, scoring and fusion (§7.19).

    Bool masks are returned as they are. Integer masks are read on the 8-bit scale (value / 255),
    float masks as given (the [0, 1] pixels of :func:`data.io.read_image`). By default a pixel is lung
    when its value is above half scale (``MASK_THRESHOLD``: > 127 in 8 bits). A number keeps the pixels
    whose value is >= ``threshold``: ``1.0`` reproduces the reference's fusion, which keeps only exact
    255 (``M[M < 255] = 0``). Give a {0, 1} integer mask as bool: it would otherwise read as 0 and 1/255.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if mask.dtype == bool:
        return mask
    values = mask / 255.0 if np.issubdtype(mask.dtype, np.integer) else mask.astype(np.float64)
    return values > MASK_THRESHOLD if threshold is None else values >= threshold


def load_mask(path: Path, mask_dir: Path | None, pixels: np.ndarray, auto: bool, max_pixels: int) -> np.ndarray:
    """The bool (H, W) lung mask of the image ``path`` whose [0, 1] ``pixels`` are (H, W):
    ``mask_dir/<name>`` or ``mask_dir/<stem>.png`` (same size, binarised by :func:`binarize_mask`), or
    with ``auto`` the built-in segmenter's (:func:`data.lungseg.segment_lungs`).

    Raises:
        ValueError: no ``mask_dir`` and not ``auto``; ImageError (naming the file): no mask file, an
            unreadable one, or one of another size; LungSegmentationError: no two lungs found.
    """
    if auto:
        from data.lungseg import segment_lungs

        return segment_lungs(pixels)
    if mask_dir is None:
        raise ValueError("the global-local path needs lung masks: give --masks DIR or set global_local.masks=auto")
    candidates = [mask_dir / path.name, mask_dir / (path.stem + ".png")]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise ImageError(candidates[-1], "lung mask not found")
    m = read_image(found, max_pixels)
    if m.size != pixels.shape:
        raise ImageError(found, f"mask size {m.size} differs from its CXR {path} of size {pixels.shape}")
    return binarize_mask(m.pixels)


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

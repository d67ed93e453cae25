"""The tone-curve baseline: one global intensity mapping CXR -> soft tissue, no spatial processing.

A bone-suppression model has to beat this, not only the identity. Soft-tissue images are shown
with a different display curve than the radiograph (darker, flatter), so most of the pixel energy
of the bone image cxr - soft is tone, and a lookup table scores a high PSNR and energy BSR without
removing a single rib. The band-limited BSR (``evaluation.band_bsr``) is the score it cannot game.

    curve = fit_tone_curve(cxr_images, soft_images)      # train split only
    soft = apply_tone_curve(curve, cxr)                  # any size, any bit depth
    write_tone_predictions(curve, cxr_dir, names, out)   # a prediction folder metrics.py scores

The curve has 256 entries, the mean soft-tissue value of the training pixels whose CXR value
rounds to each 8-bit level; levels no training pixel has take the value interpolated between
their neighbours (constant beyond the ends). Applying it interpolates linearly between levels, so
16-bit inputs keep their precision.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

LEVELS = 256


def fit_tone_curve(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Fit the curve on (cxr, soft) pairs of (H, W) arrays in [0, 1] (same shape per pair).

    Returns:
        float64 (256,): soft-tissue value for each CXR level k / 255.
    Raises:
        ValueError: no pairs, or a pair of different shapes.
    """
    total, count = np.zeros(LEVELS), np.zeros(LEVELS)
    n = 0
    for cxr, soft in pairs:
        cxr, soft = np.asarray(cxr, np.float64), np.asarray(soft, np.float64)
        if cxr.shape != soft.shape:
            raise ValueError(f"size mismatch: cxr {cxr.shape}, soft tissue {soft.shape}")
        level = np.clip(np.round(cxr * (LEVELS - 1)), 0, LEVELS - 1).astype(np.intp).ravel()
        total += np.bincount(level, weights=soft.ravel(), minlength=LEVELS)
        count += np.bincount(level, minlength=LEVELS)
        n += 1
    if n == 0:
        raise ValueError("no training pairs to fit the tone curve on")
    seen = count > 0
    levels = np.arange(LEVELS, dtype=np.float64)
    return np.interp(levels, levels[seen], total[seen] / count[seen])


def apply_tone_curve(curve: np.ndarray, cxr: np.ndarray) -> np.ndarray:
    """Map a (H, W) CXR in [0, 1] through ``curve`` (linear between levels); float32 in [0, 1]."""
    curve = np.asarray(curve, np.float64)
    if curve.shape != (LEVELS,):
        raise ValueError(f"a tone curve has {LEVELS} entries, got shape {curve.shape}")
    x = np.clip(np.asarray(cxr, np.float64), 0.0, 1.0)
    return np.clip(np.interp(x, np.linspace(0.0, 1.0, LEVELS), curve), 0.0, 1.0).astype(np.float32)


def fit_from_folders(cxr_dir: str | os.PathLike, soft_dir: str | os.PathLike, names: list[str]) -> np.ndarray:
    """Fit on the named pairs of two folders (the train split); every file is checked first."""
    from data.io import read_image

    missing = [str(Path(d) / n) for n in names for d in (cxr_dir, soft_dir) if not (Path(d) / n).is_file()]
    if missing:
        raise FileNotFoundError(f"tone curve: {len(missing)} training file(s) missing, first {missing[0]}")
    return fit_tone_curve((read_image(Path(cxr_dir) / n).pixels, read_image(Path(soft_dir) / n).pixels)
                          for n in names)


def write_tone_predictions(curve: np.ndarray, cxr_dir: str | os.PathLike, names: list[str],
                           out_dir: str | os.PathLike) -> Path:
    """Write the baseline's prediction of each named CXR to ``out_dir`` (same name and bit depth).

    The curve itself is saved beside them as ``tone_curve.txt`` (256 values, one per line).
    Returns ``out_dir``.
    """
    from data.io import read_image, write_png
    from utils.atomic import atomic_write_text

    out = Path(out_dir)
    missing = [n for n in names if not (Path(cxr_dir) / n).is_file()]
    if missing:
        raise FileNotFoundError(f"tone curve: {Path(cxr_dir) / missing[0]} not found ({len(missing)} missing)")
    for n in names:
        image = read_image(Path(cxr_dir) / n)
        write_png(out / (Path(n).stem + ".png"), apply_tone_curve(curve, image.pixels),
                  bit_depth=16 if image.bit_depth > 8 else 8, inputs=(Path(cxr_dir) / n,))
    atomic_write_text(out / "tone_curve.txt", "".join(f"{v:.8f}\n" for v in curve))
    return out

"""A training folder of random crops cut from a few registered CXR / soft-tissue pairs.

For a group with only a handful of pairs (or a quick check on real data): crops from the chest
area of each pair, every crop cut at the same place from both images, written in the dataset
layout the trainers read (CXR/, BS/, split lists) without lung masks, so the global path is used.

    names = write_crops(root, [(cxr, bs), ...], n=96, size=128, scale=0.25, split="train", seed=0)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from skimage.transform import resize

from data.io import write_png

# Where crops are cut, as fractions of the image (top, bottom, left, right): the chest with both
# lungs, ribs and clavicles, not the neck, shoulders or abdomen.
CHEST = (0.12, 0.78, 0.08, 0.92)


def random_crops(cxr: np.ndarray, bs: np.ndarray, n: int, size: int, rng: np.random.Generator,
                 region: tuple[float, float, float, float] = CHEST) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` (size x size) crops at the same random places of two (H, W) arrays, inside ``region``."""
    if cxr.shape != bs.shape:
        raise ValueError(f"size mismatch: cxr {cxr.shape}, soft tissue {bs.shape}")
    h, w = cxr.shape
    top, bottom, left, right = int(region[0] * h), int(region[1] * h), int(region[2] * w), int(region[3] * w)
    if bottom - top < size or right - left < size:
        raise ValueError(f"crops of {size} px do not fit the chest region of a {h}x{w} image")
    out = []
    for _ in range(n):
        r = int(rng.integers(top, bottom - size + 1))
        c = int(rng.integers(left, right - size + 1))
        out.append((cxr[r:r + size, c:c + size], bs[r:r + size, c:c + size]))
    return out


def write_crops(root: str | Path, pairs: list[tuple[np.ndarray, np.ndarray]], n: int, size: int, scale: float,
                prefix: str, seed: int = 0) -> list[str]:
    """Resize each (cxr, bs) pair by ``scale`` (anti-aliased), cut ``n`` crops from each, and write
    them as ``root/CXR/<prefix>_<k>.png`` and ``root/BS/...`` (8-bit). Returns the file names."""
    rng = np.random.default_rng(seed)
    names = []
    for p, (cxr, bs) in enumerate(pairs):
        shape = (round(cxr.shape[0] * scale), round(cxr.shape[1] * scale))
        small = [resize(np.asarray(x, np.float64), shape, anti_aliasing=True) for x in (cxr, bs)]
        for k, (c, b) in enumerate(random_crops(small[0], small[1], n, size, rng)):
            name = f"{prefix}_{p}_{k:04d}.png"
            write_png(Path(root) / "CXR" / name, c)
            write_png(Path(root) / "BS" / name, b)
            names.append(name)
    return names

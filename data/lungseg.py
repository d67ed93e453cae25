"""Built-in automatic lung segmentation for chest radiographs: classical, deterministic, no weights.

GL-LCM needs a lung mask per image (docs/method.md §1.4). The reference used a pretrained U-Net from the
``lungs-segmentation`` package, whose weights cannot be had offline; this module replaces it.

Pipeline, at a fixed analysis size of ANALYSIS_SIZE px on the long side (kept aspect):

1. Histogram-equalise. A rank transform makes every later threshold independent of the display
   curve, so a processed 8-bit PNG and a raw (linear-looking) CR DICOM behave alike.
2. Lung seeds are *basins*: dark regions enclosed by brighter tissue (grayscale hole filling from
   the image frame). Air outside the body is connected to the frame, so it is never a basin.
   The largest basin on each side of the spine is a lung core. Other basins are sorted by their
   spill level: a basin below a lung whose spill level is clearly higher is abdominal gas (the
   gastric bubble under the left dome); one with the lung's own spill level is more of that lung.
3. Catchments: a marker watershed of the intensity floods from the lung seeds and from the frame,
   the spine band and the gas. Leaks from a lung towards the outside stop on the highest ridge in
   between (ribs, clavicle, chest wall, diaphragm), where the two floods meet.
4. Per lung, the threshold q: within its catchment, the region {pixel < q} holding the seeds is
   computed for a grid of q and scored by the mean gradient along its boundary, since the lung
   edge (chest wall, diaphragm, heart, mediastinum) is the strongest edge around it. The highest
   q scoring within Q_TOL of the best wins: lung bases fade into the dome, and the score is flat
   there.
5. Closing and hole filling keep vessels, nodules and masses (brighter than lung) inside; the mask
   is then smoothed and upsampled to the input size.

The mask convention is that of the U-Net masks: the visible lung fields, without the heart, the
mediastinum and the lung hidden behind the diaphragm.
"""
from __future__ import annotations

import numpy as np
from skimage.exposure import equalize_hist
from skimage.filters import gaussian, sobel
from skimage.measure import label, regionprops
from skimage.morphology import closing, disk, erosion, opening, reconstruction
from skimage.segmentation import watershed
from skimage.transform import resize

ANALYSIS_SIZE = 256     # px on the long side; every size below is in analysis pixels
SEED_DEPTH = 0.2        # basin depth threshold for seeds, as a fraction of the 99th-pct depth
SPINE_HALF_WIDTH = 0.03  # half-width of the spine band excluded around the midline (fraction of W)
GAS_SPILL = 0.05        # a basin below a lung whose spill level exceeds the lung's by this is gas
SATELLITE_SPILL = 0.08  # a basin whose spill level is within this of the lung's is part of it
Q_GRID = np.arange(0.10, 0.90, 0.025)  # thresholds scanned, in equalised rank units
Q_TOL = 0.97            # take the highest q scoring within 3% of the best (faint bases, CP angles)
LUNG_AREA = (0.02, 0.30)  # plausible area of one lung, fraction of the image
MIN_CONTRAST = 0.15     # lungs must be darker than their surroundings by this (rank units)
MIN_HEIGHT, MIN_ASPECT, MIN_SOLIDITY = 0.3, 1.3, 0.7  # shape of one lung (see _check_lung)


class LungSegmentationError(ValueError):
    """No two plausible lungs were found; ``str(err)`` says what is missing."""


def segment_lungs(pixels: np.ndarray) -> np.ndarray:
    """Lung mask of a frontal (PA/AP) chest radiograph.

    Args:
        pixels: (H, W) real array in standard display (bones bright, lungs dark), any range;
            e.g. ``data.io.read_image(path).pixels``. H, W >= 32.
    Returns:
        bool (H, W): both lung fields (union), at the input size.
    Raises:
        ValueError: not a finite 2-D image of at least 32 x 32 pixels.
        LungSegmentationError: fewer than two plausible lungs (blank image, noise, not a CXR).
    """
    x = _analysis_image(pixels)
    small = _segment_small(x)
    # Smoothing the analysis mask before the bilinear upsampling gives a smooth native contour
    # instead of 4-8 px stairs.
    soft = gaussian(small.astype(np.float32), 1.0)
    return resize(soft, np.shape(pixels), order=1, anti_aliasing=False) > 0.5


def mask_report(mask: np.ndarray) -> dict:
    """Connected components of a mask, largest first.

    Args:
        mask: bool (H, W).
    Returns:
        {"n_components", "fraction" (of the image), "components": [{"area", "fraction",
        "centroid" (row, col) in [0, 1], "bbox" (r0, c0, r1, c1) px, "side"
        ("image_left" | "image_right"), "touches_border"}]}
    """
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    comps = []
    for p in sorted(regionprops(label(mask)), key=lambda p: -p.area):
        r0, c0, r1, c1 = p.bbox
        comps.append({
            "area": int(p.area), "fraction": float(p.area / mask.size),
            "centroid": (p.centroid[0] / h, p.centroid[1] / w), "bbox": (r0, c0, r1, c1),
            "side": "image_left" if p.centroid[1] < w / 2 else "image_right",
            "touches_border": r0 == 0 or c0 == 0 or r1 == h or c1 == w,
        })
    return {"n_components": len(comps), "fraction": float(mask.mean()), "components": comps}


# ------------------------------------------------------------------------------ steps

def _analysis_image(pixels: np.ndarray) -> np.ndarray:
    """(H, W) any range -> float (h, w) equalised ranks in [0, 1], long side ANALYSIS_SIZE."""
    x = np.asarray(pixels)
    if x.ndim != 2 or min(x.shape) < 32:
        raise ValueError(f"expected a 2-D image of at least 32 x 32 pixels, got shape {x.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValueError("image contains NaN or infinite values")
    if float(x.max() - x.min()) <= 1e-6 * max(1.0, float(np.abs(x).max())):
        raise LungSegmentationError("blank image: no contrast, so no lungs can be found")
    scale = ANALYSIS_SIZE / max(x.shape)
    shape = (max(32, round(x.shape[0] * scale)), max(32, round(x.shape[1] * scale)))
    x = resize(x, shape, order=1, anti_aliasing=scale < 1)
    return equalize_hist(x, nbins=1024)


def _segment_small(x: np.ndarray) -> np.ndarray:
    """Equalised analysis image (h, w) -> bool lung mask (h, w) (steps 2-5 of the module doc)."""
    h, w = x.shape
    g = gaussian(x, 1.0)                      # suppresses quantum noise, keeps the thin diaphragm
    grad = sobel(gaussian(x, 1.5))
    frame = np.zeros((h, w), bool)
    frame[:3], frame[-3:], frame[:, :3], frame[:, -3:] = True, True, True, True
    mid = _midline(g)
    hb = max(2, round(SPINE_HALF_WIDTH * w))
    spine = np.zeros((h, w), bool)
    spine[:, mid - hb:mid + hb + 1] = True

    # Basins: hole filling from the frame gives each pixel the level at which it spills outside.
    fill = g.copy()
    fill[1:-1, 1:-1] = g.max()
    fill = reconstruction(fill, g, method="erosion")
    depth = fill - g
    basins = label(opening((depth > SEED_DEPTH * np.percentile(depth, 99)) & ~frame & ~spine,
                           disk(3)))
    markers = np.zeros((h, w), np.int32)
    markers[frame | spine] = 3
    props = regionprops(basins)
    for n, side in enumerate((lambda c: c < mid, lambda c: c >= mid)):
        # The core is the largest basin of the side away from the top/bottom edges, where dark
        # air pockets between the shoulders and the image frame can also be enclosed.
        cands = [p for p in props if side(p.centroid[1]) and 0.15 * h < p.centroid[0] < 0.85 * h]
        if not cands or max(p.area for p in cands) < 0.01 * h * w:
            raise LungSegmentationError(
                f"no lung found on the image {('left', 'right')[n]} side (no dark region enclosed "
                "by brighter tissue); is this a frontal chest radiograph?")
        core = max(cands, key=lambda p: p.area)
        markers[basins == core.label] = n + 1
        core_spill = np.median(fill[basins == core.label])
        for p in props:
            if p.label == core.label or not side(p.centroid[1]):
                continue
            spill = np.median(fill[basins == p.label]) - core_spill
            if p.centroid[0] > core.centroid[0] and spill > GAS_SPILL:
                markers[basins == p.label] = 3      # gastric bubble / bowel gas under the dome
            elif abs(spill) <= SATELLITE_SPILL and p.area >= 30:
                markers[basins == p.label] = n + 1  # apex or lower zone cut off by ribs / masses
    catchment = watershed(g, markers)

    lungs = [_best_threshold(g, grad, catchment == n, markers == n) for n in (1, 2)]
    for n, lung in enumerate(lungs):
        _check_lung(lung, g, ("left", "right")[n])
    areas = [int(m.sum()) for m in lungs]
    spans = [np.nonzero(m.any(axis=1))[0][[0, -1]] for m in lungs]
    overlap = (min(spans[0][1], spans[1][1]) - max(spans[0][0], spans[1][0])) / max(
        spans[0][1] - spans[0][0], spans[1][1] - spans[1][0])
    # Real pairs: area ratio <= 1.5 and row overlap >= 0.88 (samples, DICOM, phantoms).
    if max(areas) > 4 * min(areas) or overlap < 0.6:
        raise LungSegmentationError(
            f"implausible lung pair: areas {areas[0]} and {areas[1]} px, rows overlapping by "
            f"{overlap:.0%} (expected a ratio <= 4 and >= 60%)")
    return lungs[0] | lungs[1]


def _midline(g: np.ndarray) -> int:
    """Column of the spine: the brightest column of the central band over the mid-chest rows."""
    h, w = g.shape
    profile = g[h // 4:3 * h // 4].mean(axis=0)
    lo, hi = int(0.3 * w), int(0.7 * w)
    return lo + int(np.argmax(profile[lo:hi]))


def _best_threshold(g, grad, catchment, seeds):
    """One lung: the region {g < q} in its catchment with the strongest mean boundary gradient.

    Args:
        g: float (h, w), the smoothed equalised image; grad: float (h, w), its gradient magnitude.
        catchment: bool (h, w), this lung's watershed region; seeds: bool (h, w), its basins.
    Returns:
        bool (h, w), the closed, hole-filled and opened lung, one component.
    """
    # Crop to the catchment: 4x less work per threshold.
    rows, cols = np.nonzero(catchment)
    r0, r1 = max(rows.min() - 4, 0), rows.max() + 5
    c0, c1 = max(cols.min() - 4, 0), cols.max() + 5
    g_c, grad_c = g[r0:r1, c0:c1], grad[r0:r1, c0:c1]
    catch_c, seeds_c = catchment[r0:r1, c0:c1], seeds[r0:r1, c0:c1]
    regions, scores = [], []
    for q in Q_GRID:
        # The small opening cuts one-pixel bridges (rib cortex gaps) before connectivity.
        region = opening((g_c < q) & catch_c, disk(2)) | seeds_c
        lab = label(region)
        region = _fill_holes(np.isin(lab, np.unique(lab[seeds_c])))
        edge = region & ~erosion(region, disk(1))
        regions.append(region)
        scores.append(float(grad_c[edge].mean()))
    best = regions[max(i for i, s in enumerate(scores) if s >= Q_TOL * max(scores))]
    lung = _fill_holes(closing(best, disk(5)))   # vessels, nodules, masses, rib cortex gaps
    lung = opening(lung, disk(3)) & catch_c      # spurs along rib edges
    out = np.zeros_like(catchment)
    out[r0:r1, c0:c1] = _largest(lung)
    return out


def _check_lung(lung: np.ndarray, g: np.ndarray, side: str) -> None:
    """Raise LungSegmentationError unless ``lung`` (bool (h, w)) looks like a lung field."""
    h, w = lung.shape
    frac = lung.mean()
    if not LUNG_AREA[0] <= frac <= LUNG_AREA[1]:
        raise LungSegmentationError(
            f"implausible image-{side} lung: {frac:.1%} of the image (expected "
            f"{LUNG_AREA[0]:.0%}-{LUNG_AREA[1]:.0%})")
    (p,) = regionprops(lung.astype(np.uint8))
    r0, c0, r1, c1 = p.bbox
    # Measured on the real samples, the DICOM and 20 phantoms: height >= 0.53 h, height/width
    # >= 1.9, solidity >= 0.80. Smoothed noise and checkerboards fail at least one of these.
    if r1 - r0 < MIN_HEIGHT * h or (r1 - r0) < MIN_ASPECT * (c1 - c0) or p.solidity < MIN_SOLIDITY:
        raise LungSegmentationError(
            f"implausible image-{side} lung shape: {(r1 - r0) / h:.0%} of the image height, "
            f"height/width {(r1 - r0) / (c1 - c0):.2f}, solidity {p.solidity:.2f} (expected >= "
            f"{MIN_HEIGHT:.0%}, >= {MIN_ASPECT}, >= {MIN_SOLIDITY})")
    ring = (~lung) & (_dilate(lung, 6))
    contrast = np.median(g[ring]) - np.median(g[lung])
    if contrast < MIN_CONTRAST:
        raise LungSegmentationError(f"no lung on the image {side}: the best dark region is only "
                                    f"{contrast:.2f} darker than its surroundings (rank units)")


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of bool (h, w) by a disk of radius r."""
    return ~erosion(~mask, disk(r))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """bool (h, w) with every background region not connected to the border filled."""
    lab = label(~mask, connectivity=1)
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    return mask | ~np.isin(lab, border)


def _largest(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of bool (h, w) (the mask itself when empty)."""
    lab = label(mask)
    if lab.max() == 0:
        return mask
    return lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1

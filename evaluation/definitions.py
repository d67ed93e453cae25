"""Metric definitions: BSR (published, symmetric, band-limited), MSE, PSNR, SSIM, and the resampling
the published tables score at (docs/method.md §6.1, §7 items 21-24).

Every function takes (H, W) float arrays in [0, 1]; none reads files or keeps state.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

REFERENCE_SIZE = 1024  # the reference resizes every image to 1024² before scoring
MODES = ("faithful", "corrected")
FAITHFUL_METRICS = ("bsr", "bsr_sym", "mse", "psnr", "ssim", "lpips")
# Band-limited symmetric BSR: the same ratio on high-pass components x - G_sigma(x), sigma = width / s.
# Named by s so a band means the same anatomy at 256², 1024² and 2k (see band_bsr).
BANDS = {"hp32": 32, "hp64": 64}
CORRECTED_METRICS = ("bsr_sym", "bsr_hp32", "bsr_hp64", "mse", "psnr", "ssim", "lpips")
LUNG_METRICS = ("bsr_sym_lung", "bsr_hp32_lung", "bsr_hp64_lung", "mse_lung", "psnr_lung", "ssim_lung")
# Table label and display scale, as in the paper tables (BSR in %, MSE in 10⁻³).
LABELS = {
    "bsr": ("BSR, published (%) ↑", 100.0),
    "bsr_sym": ("BSR, symmetric (%) ↑", 100.0),
    "bsr_hp32": ("BSR, high-pass σ = W/32 (%) ↑", 100.0),
    "bsr_hp64": ("BSR, high-pass σ = W/64 (%) ↑", 100.0),
    "mse": ("MSE (10⁻³) ↓", 1e3),
    "psnr": ("PSNR (dB) ↑", 1.0),
    "ssim": ("SSIM ↑", 1.0),
    "lpips": ("LPIPS ↓", 1.0),
    "bsr_sym_lung": ("BSR, symmetric, lungs (%) ↑", 100.0),
    "bsr_hp32_lung": ("BSR, high-pass σ = W/32, lungs (%) ↑", 100.0),
    "bsr_hp64_lung": ("BSR, high-pass σ = W/64, lungs (%) ↑", 100.0),
    "mse_lung": ("MSE, lungs (10⁻³) ↓", 1e3),
    "psnr_lung": ("PSNR, lungs (dB) ↑", 1.0),
    "ssim_lung": ("SSIM, lungs ↑", 1.0),
}


# ------------------------------------------------------------------------------ resampling

def quantize_8bit(x: np.ndarray) -> np.ndarray:
    """Round [0, 1] pixels to the 256 levels of an 8-bit image, as float64 in [0, 1].

    The reference reads every image as 8-bit. 8-bit files come back unchanged; a 16-bit file v
    becomes round(v * 255 / 65535) / 255 (OpenCV's PNG reader would drop the low byte, v >> 8, which
    can differ by one gray level).
    """
    return np.round(np.asarray(x, dtype=np.float64) * 255.0) / 255.0


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weight of i1 for each of n_out samples, half-pixel centres."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    # Clamping the coordinate is OpenCV's border handling for INTER_LINEAR (edge pixels replicated).
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W) array to ``size`` = (h, w), as OpenCV ``cv.resize(INTER_LINEAR)``.

    Half-pixel centres (source coordinate (i + 0.5) * H / h - 0.5), edges replicated, no
    antialiasing; equal to ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False,
    antialias=False)``. Downsampling is therefore plain 2-tap interpolation, as in OpenCV (which
    switches to INTER_AREA for an exact 2x reduction; that gives the same 2x2 average). OpenCV keeps
    its interpolation weights in float32, so it can differ from this float64 result by ~1e-7.
    Returns float64 (h, w); a same-size call returns the input values unchanged.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a (H, W) array, got shape {x.shape}")
    h, w = size
    if x.shape == (h, w):
        return x
    r0, r1, wr = _linear_taps(x.shape[0], h)
    x = x[r0] * (1.0 - wr)[:, None] + x[r1] * wr[:, None]
    c0, c1, wc = _linear_taps(x.shape[1], w)
    return x[:, c0] * (1.0 - wc) + x[:, c1] * wc


# ------------------------------------------------------------------------------ pixel metrics

def _masked_sum(x: np.ndarray, mask: np.ndarray | None) -> float:
    return float(np.sum(x if mask is None else x[mask]))


def bsr_published(cxr: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                  size: tuple[int, int] | None = (REFERENCE_SIZE, REFERENCE_SIZE)) -> float:
    """Bone suppression ratio exactly as the reference code computes it (docs/method.md §6.1).

    Args:
        cxr, gt, pred: (H, W) arrays in [0, 1] at native size (the reference passes 8-bit / 255).
        size: (h, w) to resize gt, pred and the bone image to (bilinear); None: no resize.
    Returns:
        1 - Σ max(gt - pred', 0)² / Σ bone², with bone = cxr - gt computed *before* the resize and
        pred' = pred + mean(gt - pred) (a global mean shift). Only pixels where the shifted
        prediction is darker than the target count, so leftover bright bone is penalised only
        through the mean shift: the identity prediction (pred = cxr) already scores high.
        NaN when the bone image is zero.
    """
    # Bilinear resizing is linear, so resizing cxr - gt equals subtracting the resizes; bone is
    # still formed first to follow the reference step by step.
    bone = np.asarray(cxr, np.float64) - np.asarray(gt, np.float64)
    gt, pred = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    if size is not None:
        bone, gt, pred = (resize_bilinear(a, size) for a in (bone, gt, pred))
    pred = pred + np.mean(gt - pred)
    bias = np.maximum(gt - pred, 0.0)
    denom = float(np.sum(bone**2))
    return 1.0 - float(np.sum(bias**2)) / denom if denom > 0 else math.nan


def bsr_symmetric(cxr: np.ndarray, gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Usual bone suppression ratio 1 - Σ(pred - gt)² / Σ(cxr - gt)² on same-size arrays.

    Args:
        cxr, gt, pred: (H, W) arrays in [0, 1]. mask: optional (H, W) bool, sums over True pixels.
    Returns:
        1 for a perfect prediction, 0 for the identity prediction (pred = cxr), negative when worse
        than doing nothing; NaN when cxr = gt on the scored pixels.
    """
    gt = np.asarray(gt, np.float64)
    num = _masked_sum((np.asarray(pred, np.float64) - gt) ** 2, mask)
    denom = _masked_sum((np.asarray(cxr, np.float64) - gt) ** 2, mask)
    return 1.0 - num / denom if denom > 0 else math.nan


def _mirrored(x: np.ndarray) -> np.ndarray:
    """(H, W) -> (2H, 2W): x and its mirror images, whose periodic extension has no border jumps."""
    ext = np.concatenate([x, x[::-1]], axis=0)
    return np.concatenate([ext, ext[:, ::-1]], axis=1)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (H, W) array with mirrored borders, exact for any sigma (pixels).

    The image is mirrored (half-sample symmetric, as ``scipy.ndimage``'s "reflect") to (2H, 2W),
    whose periodic convolution is then done in the Fourier domain with the Gaussian's transfer
    function exp(-2 pi^2 sigma^2 f^2). So even a sigma of a quarter of the width costs one FFT and
    never wraps the opposite border in. Returns float64 (H, W); sigma 0 returns the input.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a (H, W) array, got shape {x.shape}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x
    h, w = x.shape
    ext = _mirrored(x)
    fy = np.fft.fftfreq(2 * h)[:, None]
    fx = np.fft.rfftfreq(2 * w)[None, :]
    transfer = np.exp(-2.0 * np.pi**2 * sigma**2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(ext) * transfer, s=ext.shape)[:h, :w]


def highpass(x: np.ndarray, scale: float) -> np.ndarray:
    """x - G_sigma(x) with sigma = width / ``scale`` pixels (the band of :data:`BANDS` named by scale)."""
    x = np.asarray(x, np.float64)
    return x - gaussian_blur(x, x.shape[-1] / scale)


def band_bsr(cxr: np.ndarray, gt: np.ndarray, pred: np.ndarray, scale: float,
             mask: np.ndarray | None = None) -> float:
    """Symmetric BSR of the high-pass components: 1 - Σ HP(pred - gt)² / Σ HP(cxr - gt)².

    HP(x) = x - G_sigma(x), sigma = W / ``scale`` (W the image width in pixels), so the band is
    the same fraction of the field of view at every resolution. At 256² (the demo) scale 32 is
    sigma = 8 px, rib-sized structure and finer; scale 64 (4 px) keeps rib edges, cortex, vessels
    and noise. A global tone curve, a brightness change or any smooth correction leaves this
    score near 0; only removing the bones' edges raises it. 1 for the target, 0 for the identity
    (pred = cxr), negative when the prediction adds structure (artefacts, noise) or moves edges.

    Args:
        cxr, gt, pred: (H, W) arrays in [0, 1], one size. mask: optional (H, W) bool; the
            high-pass images are computed on the whole image, the sums taken over the mask.
    Returns:
        float; NaN when the bone image has no energy in the band on the scored pixels.
    """
    gt = np.asarray(gt, np.float64)
    err = highpass(np.asarray(pred, np.float64) - gt, scale)
    bone = highpass(np.asarray(cxr, np.float64) - gt, scale)
    num, denom = _masked_sum(err**2, mask), _masked_sum(bone**2, mask)
    return 1.0 - num / denom if denom > 0 else math.nan


def band_energies(x: np.ndarray, scales: Sequence[float] = (4, 8, 16, 32, 64, 128)) -> dict[str, float]:
    """Share of the energy Σx² of a (H, W) image in each frequency band; bands relative to the width.

    Cut-offs are the Gaussian scales sigma_k = W / scales[k] (ascending: coarse to fine), with
    G_k(f) = exp(-2 pi^2 sigma_k^2 f^2) the Gaussian's transfer function. The bands split the power
    spectrum (of the mirrored image, so borders add nothing) with weights that add up to 1:
    "tone" G_0², one band "W/a-W/b" = G_{k+1}² - G_k² per pair of cut-offs, and "fine" 1 - G_last²,
    so the shares add up to 1 exactly. "tone" holds the mean and every structure coarser than
    W / scales[0]. Used on the bone image cxr - soft tissue: how much of it is a display difference
    (tone) and how much is bone structure.
    """
    x = np.asarray(x, np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a (H, W) array, got shape {x.shape}")
    h, w = x.shape
    power = np.abs(np.fft.fft2(_mirrored(x))) ** 2
    total = float(power.sum())
    if total <= 0:
        raise ValueError("the image has no energy")
    f2 = np.fft.fftfreq(2 * h)[:, None] ** 2 + np.fft.fftfreq(2 * w)[None, :] ** 2
    g2 = [np.exp(-4.0 * np.pi**2 * (w / s) ** 2 * f2) for s in scales]   # squared transfer functions
    weights = {"tone": g2[0]}
    for a, b, lo, hi in zip(scales, scales[1:], g2, g2[1:]):
        weights[f"W/{a:g}-W/{b:g}"] = hi - lo
    weights["fine"] = 1.0 - g2[-1]
    return {k: float(np.sum(power * v)) / total for k, v in weights.items()}


def mean_band_energies(images: Iterable[np.ndarray], scales: Sequence[float] = (4, 8, 16, 32, 64, 128)) -> dict[str, float]:
    """Per band, the mean over ``images`` of :func:`band_energies` (each image weighs the same)."""
    shares = [band_energies(x, scales) for x in images]
    if not shares:
        raise ValueError("no images")
    return {k: float(np.mean([s[k] for s in shares])) for k in shares[0]}


def nodule_contrast(image: np.ndarray, row: float, col: float, radius: float) -> float:
    """Contrast of a round lesion: mean inside 0.7 r minus the mean of the ring 1.5 r .. 2.5 r.

    Args: (H, W) image in [0, 1] and the lesion's centre and radius in pixels. On the soft-tissue
    target this is what a bone-suppression model must keep; the ratio prediction / target says
    how much of it survived (1 = all of it). NaN when the lesion or its ring is off the image.
    """
    img = np.asarray(image, np.float64)
    rr, cc = np.ogrid[: img.shape[0], : img.shape[1]]
    d = np.hypot(rr - row, cc - col)
    inner, ring = d <= 0.7 * radius, (d >= 1.5 * radius) & (d <= 2.5 * radius)
    if not inner.any() or not ring.any():
        return math.nan
    return float(img[inner].mean() - img[ring].mean())


def mse(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean squared error of (H, W) arrays on the [0, 1] scale (mean over ``mask`` if given; NaN if empty)."""
    d2 = (np.asarray(pred, np.float64) - np.asarray(gt, np.float64)) ** 2
    n = d2.size if mask is None else int(np.count_nonzero(mask))
    return _masked_sum(d2, mask) / n if n else math.nan


def psnr_from_mse(m: float) -> float:
    """PSNR in dB with peak 1: -10 log10(mse). +inf for mse = 0 (identical images), NaN for NaN."""
    if math.isnan(m):
        return math.nan
    return math.inf if m <= 0 else -10.0 * math.log10(m)


def psnr(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Per-image PSNR (dB, peak 1) of (H, W) arrays in [0, 1]; +inf when identical (see psnr_from_mse)."""
    return psnr_from_mse(mse(gt, pred, mask))


def ssim(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM of (H, W) arrays in [0, 1]: skimage ``structural_similarity`` with data_range 1.

    skimage defaults: 7x7 uniform window, sample covariance, K1 0.01, K2 0.03. Without a mask it is
    skimage's mean (the 3-pixel border excluded); with a mask, the mean of the full SSIM map over
    the mask pixels. NaN for an empty mask.
    """
    from skimage.metrics import structural_similarity

    gt, pred = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    if mask is None:
        return float(structural_similarity(gt, pred, data_range=1.0))
    if not np.any(mask):
        return math.nan
    _, smap = structural_similarity(gt, pred, data_range=1.0, full=True)
    return float(np.mean(smap[mask]))


def score_pair(cxr: np.ndarray, gt: np.ndarray, pred: np.ndarray, mode: str = "faithful",
               mask: np.ndarray | None = None,
               size: tuple[int, int] | None = (REFERENCE_SIZE, REFERENCE_SIZE),
               ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Every pixel metric of one case in ``mode``, plus the images LPIPS must see.

    Args:
        cxr, gt, pred: (H, W) arrays in [0, 1], same native size.
        mode: "faithful" (8-bit quantised, published BSR + symmetric BSR) or "corrected".
        mask: (H, W) bool lung mask at native size or at ``size`` (corrected mode only); adds the
            ``*_lung`` metrics.
        size: (h, w) scoring size, None for native resolution (corrected mode only).
    Returns:
        (values, gt_s, pred_s): metric name -> float (no "lpips"), and the float64 (h, w) gt and
        prediction at the scoring size.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (cxr.shape == gt.shape == pred.shape):
        raise ValueError(f"size mismatch: cxr {cxr.shape}, gt {gt.shape}, pred {pred.shape}")
    if mode == "faithful":
        if mask is not None or size != (REFERENCE_SIZE, REFERENCE_SIZE):
            raise ValueError("faithful mode scores whole images at 1024²: mask and size are corrected-mode options")
        cxr, gt, pred = (quantize_8bit(a) for a in (cxr, gt, pred))
        gt_s, pred_s = resize_bilinear(gt, size), resize_bilinear(pred, size)
        cxr_s = resize_bilinear(cxr, size)
        values = {"bsr": bsr_published(cxr, gt, pred, size)}
    else:
        target = gt.shape if size is None else size
        cxr_s, gt_s, pred_s = (resize_bilinear(a, target) for a in (cxr, gt, pred))
        values = {}
    values["bsr_sym"] = bsr_symmetric(cxr_s, gt_s, pred_s)
    if mode == "corrected":
        for band, scale in BANDS.items():
            values[f"bsr_{band}"] = band_bsr(cxr_s, gt_s, pred_s, scale)
    values["mse"] = mse(gt_s, pred_s)
    values["psnr"] = psnr_from_mse(values["mse"])
    values["ssim"] = ssim(gt_s, pred_s)
    if mask is not None:
        mask = _mask_at(mask, gt.shape, gt_s.shape)
        values["bsr_sym_lung"] = bsr_symmetric(cxr_s, gt_s, pred_s, mask)
        for band, scale in BANDS.items():
            values[f"bsr_{band}_lung"] = band_bsr(cxr_s, gt_s, pred_s, scale, mask)
        values["mse_lung"] = mse(gt_s, pred_s, mask)
        values["psnr_lung"] = psnr_from_mse(values["mse_lung"])
        values["ssim_lung"] = ssim(gt_s, pred_s, mask)
    return values, gt_s, pred_s


def _mask_at(mask: np.ndarray, native: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """A bool mask given at the native or the scoring size, brought to the scoring size."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(target):
        return mask
    if mask.shape != tuple(native):
        raise ValueError(f"size mismatch: mask {mask.shape}, images {native}")
    # Bilinear then > 0.5 keeps the boundary where the resized images put it.
    return resize_bilinear(mask.astype(np.float64), target) > 0.5

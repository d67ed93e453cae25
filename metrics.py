"""Bone-suppression metrics: BSR, MSE, PSNR, SSIM and LPIPS, as the published tables compute them and corrected.

Usage:
    # the numbers of the GL-LCM / BS-LDM tables (method.md §6.1), over the files of a test list
    python metrics.py --cxr DATA/CXR --gt DATA/BS --pred runs/ldm/001-szch/samples \
        --list DATA/test.txt --out runs/ldm/001-szch/eval

    # corrected metrics, also inside the lung masks, at the images' native resolution
    python metrics.py --cxr DATA/CXR --gt DATA/BS --pred PRED --mode corrected --mask DATA/Mask --native

Writes ``<out>/metrics_<mode>.csv`` (one row per listed image, failed ones included, with the reason)
and ``<out>/metrics_<mode>.json`` (summary: mode, counts, per-metric mean / population std, LPIPS
availability), then prints a markdown table of mean ± std. ``--out`` defaults to the prediction folder.

Images are paired by file name (``--list`` names may omit the extension). Without ``--list`` every
image of ``--gt`` is scored, so a missing prediction is reported rather than silently skipped.

Exit status: 0 every listed image was scored; 1 some could not be (missing, unreadable, size
mismatch: each reported on stderr and in the reports, the others still scored); 2 bad arguments, or
``--require-lpips`` while the LPIPS weights are not in the torch hub cache (checked before any work).

Modes (method.md §6, §7 items 21-24):
    faithful   the published code: 8-bit inputs, bone = cxr - gt at native size, everything resized
               to 1024² (bilinear), BSR with a global mean shift and a one-sided residual, MSE on
               [0, 1], PSNR per image with peak 1, LPIPS (AlexNet v0.1) fed [0, 1] single-channel
               images without normalisation. The symmetric BSR is reported beside it.
    corrected  symmetric BSR, band-limited symmetric BSR (bsr_hp32, bsr_hp64: the same ratio on
               high-pass components x - G_sigma(x), sigma = width / 32 and width / 64, so tone
               changes score 0 and only removed bone edges count), LPIPS on [-1, 1], full bit
               depth; ``--mask`` adds scores inside the lung mask, ``--native`` scores at native
               resolution instead of 1024².
Both modes: SSIM (skimage, data_range 1, 7x7 uniform window) as an extra column; summaries are the
mean and population std (ddof 0); an identical pair has PSNR = inf, excluded from the PSNR mean and
std and counted as ``n_inf`` in the summary.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from data.io import ImageError, is_image_file, read_image
from data.splits import read_list
from utils.hub import ALEXNET_FILE, hub_checkpoint_path
from utils.atomic import atomic_write_text, UnwritableError, require_writable

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
    """Bone suppression ratio exactly as the reference code computes it (method.md §6.1).

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


# ------------------------------------------------------------------------------ LPIPS

class LpipsUnavailable(RuntimeError):
    """The LPIPS network cannot be built here; ``str(err)`` says what to install or place where."""


def lpips_weights_path() -> Path:
    """Where the LPIPS AlexNet backbone must be: torchvision's ImageNet weights in the hub cache."""
    return hub_checkpoint_path(ALEXNET_FILE)


def lpips_unavailable_reason() -> str | None:
    """None when LPIPS (AlexNet, v0.1) can be built without a download, else why not (one line)."""
    try:
        import lpips
    except ImportError:
        return "the lpips package is not installed (pip install lpips==0.1.4)"
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not heads.is_file():
        return f"the lpips package has no linear-head weights at {heads}"
    path = lpips_weights_path()
    if not path.is_file():
        return (f"AlexNet weights not found: place {path.name} (torchvision AlexNet IMAGENET1K_V1) "
                f"in {path.parent}")
    return None


def build_lpips_net(random_backbone: bool = False):
    """``lpips.LPIPS(net='alex', version='0.1')`` in eval mode, without its set-up prints.

    Args:
        random_backbone: randomly initialised AlexNet (``pnet_rand=True``; the linear heads ship
            with the package), for tests: nothing is downloaded or read from the hub cache.
    Raises:
        LpipsUnavailable: weights missing (checked first, so no download is ever attempted) or
            unreadable.
    """
    reason = None if random_backbone else lpips_unavailable_reason()
    if reason:
        raise LpipsUnavailable(reason)
    import lpips

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # lpips 0.1.4 calls tv.alexnet(pretrained=...), deprecated in torchvision but equivalent.
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            net = lpips.LPIPS(net="alex", version="0.1", pnet_rand=random_backbone, verbose=False)
    except Exception as e:  # a truncated or foreign file in the hub cache
        raise LpipsUnavailable(f"cannot build LPIPS from {lpips_weights_path()}: {type(e).__name__}: {e}") from None
    return net.eval()


class LpipsScorer:
    """LPIPS built once and run in batches, on the GPU when there is one.

    Args:
        net: a module called as ``net(x0, x1)`` on (B, C, H, W) float32 tensors, returning (B, 1, 1, 1)
            (default: ``build_lpips_net(random_backbone)``). Injectable for tests.
        random_backbone: see :func:`build_lpips_net`.
        device: "cuda", "cpu", ... (default: cuda if available).
        batch_size: image pairs per forward pass.
    """

    def __init__(self, net=None, random_backbone: bool = False, device: str | None = None, batch_size: int = 4):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.net = (net if net is not None else build_lpips_net(random_backbone)).to(self.device).eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.batch_size = batch_size

    def __call__(self, gt: Sequence[np.ndarray] | np.ndarray, pred: Sequence[np.ndarray] | np.ndarray,
                 mode: str = "faithful") -> np.ndarray:
        """LPIPS distance of each pair.

        Args:
            gt, pred: N images each, (N, H, W) or a sequence of (H, W) arrays, in [0, 1], one size.
            mode: "faithful" feeds (B, 1, H, W) in [0, 1] as the reference did (LPIPS expects
                [-1, 1]; its per-channel scaling layer broadcasts the single channel to three);
                "corrected" feeds 2x - 1 repeated to (B, 3, H, W).
        Returns:
            float64 (N,).
        """
        import torch

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        gt, pred = np.asarray(gt, np.float32), np.asarray(pred, np.float32)
        if gt.shape != pred.shape or gt.ndim != 3:
            raise ValueError(f"expected two (N, H, W) stacks of one shape, got {gt.shape} and {pred.shape}")
        out = []
        with torch.no_grad():
            for i in range(0, len(gt), self.batch_size):
                x0, x1 = (torch.from_numpy(a[i:i + self.batch_size, None]).to(self.device) for a in (gt, pred))
                if mode == "corrected":
                    x0, x1 = ((2 * x - 1).expand(-1, 3, -1, -1) for x in (x0, x1))
                out.append(self.net(x0, x1).reshape(-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)


# ------------------------------------------------------------------------------ files

class _Folder:
    """Finds a case's file in one folder: by exact name, else by stem among the image files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.by_stem: dict[str, list[str]] = {}
        for f in sorted(os.listdir(self.root)):
            if is_image_file(f):
                self.by_stem.setdefault(Path(f).stem, []).append(f)

    def find(self, name: str) -> tuple[Path | None, str]:
        """(path, "") or (None, why not)."""
        exact = self.root / name
        if exact.is_file():
            return exact, ""
        hits = self.by_stem.get(Path(name).stem if is_image_file(name) else name, [])
        if len(hits) == 1:
            return self.root / hits[0], ""
        if hits:
            return None, f"ambiguous, several files match in {self.root}: {', '.join(hits)}"
        return None, f"not found in {self.root}"

    def names(self) -> list[str]:
        return [f for files in self.by_stem.values() for f in files]


def _fmt_size(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _load_case(name: str, folders: dict[str, _Folder], mode: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read every image of one case; return (arrays by role, problems)."""
    arrays, problems = {}, []
    for role, folder in folders.items():
        path, why = folder.find(name)
        if path is None:
            problems.append(f"missing {role} ({why})")
            continue
        try:
            arrays[role] = read_image(path).pixels
        except ImageError as e:
            problems.append(f"unreadable {role}: {e}")
    images = {r: a.shape for r, a in arrays.items() if r != "mask"}
    if not problems and len(set(images.values())) > 1:
        problems.append("size mismatch: " + ", ".join(f"{r} {_fmt_size(s)}" for r, s in images.items()))
    return arrays, problems


# ------------------------------------------------------------------------------ evaluation

def evaluate(names: Iterable[str], cxr_dir: str | os.PathLike, gt_dir: str | os.PathLike,
             pred_dir: str | os.PathLike, mode: str = "faithful", mask_dir: str | os.PathLike | None = None,
             native: bool = False, scorer: LpipsScorer | None = None,
             on_problem: Callable[[str, str], None] | None = None) -> list[dict]:
    """Score every named case; failed ones become rows with status "failed" and the reason.

    Args:
        names: file names (or stems) present in the gt folder.
        mode, native: see :func:`score_pair`; mask_dir: lung masks (corrected mode).
        scorer: LPIPS scorer; None leaves the "lpips" column empty.
        on_problem: called as on_problem(name, reason) for each case that cannot be scored.
    Returns:
        One dict per name, in order: name, status ("ok" / "failed"), error, height, width and the
        metric columns (float, NaN / inf possible; None when not computed).
    """
    folders = {"cxr": _Folder(cxr_dir), "gt": _Folder(gt_dir), "prediction": _Folder(pred_dir)}
    if mask_dir is not None:
        folders["mask"] = _Folder(mask_dir)
    columns = metric_columns(mode, mask_dir is not None)
    size = None if native else (REFERENCE_SIZE, REFERENCE_SIZE)
    rows: list[dict] = []
    pending: list[tuple[dict, np.ndarray, np.ndarray]] = []  # LPIPS waits for a full batch

    def flush():
        if pending and scorer is not None:
            values = scorer([p[1] for p in pending], [p[2] for p in pending], mode)
            for (row, _, _), v in zip(pending, values):
                row["lpips"] = float(v)
        pending.clear()

    for name in _progress(list(names)):
        row = {"name": name, "status": "ok", "error": "", "height": None, "width": None}
        row.update({c: None for c in columns})
        rows.append(row)
        arrays, problems = _load_case(name, folders, mode)
        if not problems:
            try:
                # > 127 on 8-bit masks; the half level keeps float32 rounding off the threshold.
                mask = arrays["mask"] > 127.5 / 255.0 if "mask" in arrays else None
                values, gt_s, pred_s = score_pair(arrays["cxr"], arrays["gt"], arrays["prediction"],
                                                  mode, mask, size)
            except ValueError as e:  # a mask of a third size
                problems.append(str(e))
        if problems:
            row.update(status="failed", error="; ".join(problems))
            if on_problem is not None:
                on_problem(name, row["error"])
            continue
        row["height"], row["width"] = arrays["gt"].shape
        row.update(values)
        if scorer is not None:
            if pending and pending[-1][1].shape != gt_s.shape:  # native sizes differ: new batch
                flush()
            pending.append((row, gt_s.astype(np.float32), pred_s.astype(np.float32)))
            if len(pending) >= scorer.batch_size:
                flush()
    flush()
    return rows


def _progress(items: list) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="metrics", unit="img", disable=None, file=sys.stderr)


def metric_columns(mode: str, with_mask: bool = False) -> tuple[str, ...]:
    """Metric column names of ``mode`` (lung columns with a mask)."""
    return (FAITHFUL_METRICS if mode == "faithful" else CORRECTED_METRICS) + (LUNG_METRICS if with_mask else ())


def summarize(rows: list[dict], columns: Sequence[str]) -> dict[str, dict]:
    """Per metric: mean and population std (ddof 0) over the finite values of the scored rows.

    +inf (PSNR of an identical pair) and NaN (empty mask, zero bone image) are left out of mean
    and std and counted in ``n_inf`` / ``n_nan``; ``n`` is the number of values averaged.
    """
    out = {}
    for c in columns:
        vals = np.array([r[c] for r in rows if r["status"] == "ok" and r[c] is not None], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        out[c] = {"mean": float(finite.mean()) if finite.size else None,
                  "std": float(finite.std(ddof=0)) if finite.size else None,
                  "n": int(finite.size), "n_inf": int(np.isinf(vals).sum()), "n_nan": int(np.isnan(vals).sum())}
    return out


def markdown_table(stats: dict[str, dict], n_scored: int, n_listed: int, mode: str, size: str,
                   lpips_reason: str | None = None) -> str:
    """The summary as a markdown table (BSR in %, MSE in 10⁻³, 3 decimals as in the paper tables)."""
    lines = ["| metric | mean ± std |", "| --- | --- |"]
    for c, s in stats.items():
        label, scale = LABELS[c]
        if c == "lpips" and lpips_reason:
            cell = "unavailable (weights missing, see stderr)"
        elif s["mean"] is None:
            cell = "n/a"
        else:
            cell = f"{s['mean'] * scale:.3f} ± {s['std'] * scale:.3f}"
            extra = [f"{s['n_inf']} × inf" if s["n_inf"] else "", f"{s['n_nan']} × NaN" if s["n_nan"] else ""]
            if any(extra):
                cell += f" ({', '.join(e for e in extra if e)} excluded)"
        lines.append(f"| {label} | {cell} |")
    lines.append("")
    lines.append(f"{n_scored} of {n_listed} images scored ({mode} mode, {size}; std = population std).")
    return "\n".join(lines)


def _csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.10g}")
        return str(v)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["name", "status", "error", "height", "width", *columns]
    writer.writerow(header)
    for r in rows:
        writer.writerow([cell(r[h]) for h in header])
    return buf.getvalue()


# ------------------------------------------------------------------------------ CLI

def create_argparser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cxr", required=True, help="folder of the input radiographs")
    p.add_argument("--gt", required=True, help="folder of the target soft-tissue images")
    p.add_argument("--pred", required=True, help="folder of the predictions (same file names)")
    p.add_argument("--list", help="split list: the names to score (default: every image in --gt)")
    p.add_argument("--mode", choices=MODES, default="faithful")
    p.add_argument("--mask", help="lung-mask folder (mask > 127 = lung): adds *_lung columns (corrected mode)")
    p.add_argument("--native", action="store_true", help="score at native resolution, not 1024² (corrected mode)")
    p.add_argument("--out", help="folder for metrics_<mode>.csv/.json (default: --pred)")
    p.add_argument("--require-lpips", action="store_true",
                   help="exit with status 2 before scoring when the LPIPS weights are not available")
    p.add_argument("--device", help="LPIPS device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=4, help="LPIPS image pairs per forward pass")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 all scored, 1 some failed, 2 unusable arguments)."""
    parser = create_argparser()
    args = parser.parse_args(argv)
    if args.mode == "faithful" and (args.mask or args.native):
        parser.error("--mask and --native are corrected-mode options (the published metrics have neither)")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    for flag in ("cxr", "gt", "pred", "mask"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_dir():
            parser.error(f"--{flag} {getattr(args, flag)}: not a folder")
    if args.list and not Path(args.list).is_file():
        parser.error(f"--list {args.list}: no such file")
    try:
        require_writable(args.out or args.pred)      # before the scoring, not after it
    except UnwritableError as e:
        parser.error(str(e))

    scorer, lpips_reason = None, lpips_unavailable_reason()
    if lpips_reason is None:
        try:
            scorer = LpipsScorer(device=args.device, batch_size=args.batch_size)
        except LpipsUnavailable as e:
            lpips_reason = str(e)
    if lpips_reason:
        if args.require_lpips:
            print(f"metrics.py: LPIPS required but unavailable: {lpips_reason}", file=sys.stderr)
            return 2
        print(f"metrics.py: LPIPS not computed: {lpips_reason}", file=sys.stderr)

    names = read_list(args.list) if args.list else _Folder(args.gt).names()
    if not names:
        parser.error("nothing to score: the list / gt folder has no images")

    def report(name, why):
        print(f"metrics.py: {name}: {why}", file=sys.stderr)

    rows = evaluate(names, args.cxr, args.gt, args.pred, args.mode, args.mask, args.native, scorer, report)

    columns = metric_columns(args.mode, bool(args.mask))
    stats = summarize(rows, columns)
    failures = [{"name": r["name"], "error": r["error"]} for r in rows if r["status"] != "ok"]
    size = "native" if args.native else f"{REFERENCE_SIZE}x{REFERENCE_SIZE}"
    summary = {
        "mode": args.mode,
        "size": size,
        "n_listed": len(rows),
        "n_scored": len(rows) - len(failures),
        "n_failed": len(failures),
        "metrics": stats,
        "lpips": {"available": scorer is not None, "reason": lpips_reason,
                  "network": "AlexNet, v0.1 (lpips package)",
                  "input_range": "[0, 1], 1 channel (as published)" if args.mode == "faithful" else "[-1, 1], 3 channels",
                  "weights": str(lpips_weights_path()),
                  "device": str(scorer.device) if scorer is not None else None},
        "psnr_identical": "inf per image; excluded from mean/std, counted in n_inf",
        "failures": failures,
        "inputs": {"cxr": args.cxr, "gt": args.gt, "pred": args.pred, "list": args.list, "mask": args.mask},
    }
    out = Path(args.out or args.pred)
    tag = args.mode + ("_native" if args.native else "")
    atomic_write_text(out / f"metrics_{tag}.csv", _csv_text(rows, columns))
    atomic_write_text(out / f"metrics_{tag}.json", json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    print(markdown_table(stats, summary["n_scored"], len(rows), args.mode, size, lpips_reason))
    print(f"\nwrote {out / f'metrics_{tag}.csv'} and {out / f'metrics_{tag}.json'}")
    if failures:
        print(f"metrics.py: {len(failures)} of {len(rows)} images could not be scored (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

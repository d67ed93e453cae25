"""Evaluation: metric definitions, LPIPS, file pairing, folder scoring, summaries, the tone-curve baseline.

    definitions   BSR (published, symmetric, band-limited), MSE, PSNR, SSIM, resampling, band energies
    perceptual    LPIPS built once without a download (``lpips_scorer``)
    pairing       the files of one case across folders, by name or stem
    scoring       ``score_folder`` -> ``FolderReport`` (rows, summary, ``write``)
    summary       mean / population std per metric, the markdown table, the CSV text
    tone_curve    the tone-curve baseline every model must beat
    goals         the bone-removal goals, measured against the tone curve (``bone_removal_failures``)

``metrics.py`` is the command line over this package.
"""
from evaluation.definitions import (BANDS, CORRECTED_METRICS, FAITHFUL_METRICS, LABELS, LUNG_METRICS, MODES,
                                    REFERENCE_SIZE, band_bsr, band_energies, bsr_published, bsr_symmetric,
                                    gaussian_blur, highpass, mean_band_energies, mse, nodule_contrast, psnr,
                                    psnr_from_mse, quantize_8bit, resize_bilinear, score_pair, ssim)
from evaluation.pairing import ImageFolder, load_case
from evaluation.perceptual import (LpipsScorer, LpipsUnavailable, build_lpips_net, lpips_scorer,
                                   lpips_unavailable_reason, lpips_weights_path)
from evaluation.scoring import FolderReport, evaluate, score_folder
from evaluation.summary import csv_text, markdown_table, metric_columns, summarize
from evaluation.tone_curve import apply_tone_curve, fit_from_folders, fit_tone_curve, write_tone_predictions

__all__ = [
    "BANDS", "CORRECTED_METRICS", "FAITHFUL_METRICS", "LABELS", "LUNG_METRICS", "MODES", "REFERENCE_SIZE",
    "band_bsr", "band_energies", "bsr_published", "bsr_symmetric", "gaussian_blur", "highpass",
    "mean_band_energies", "mse", "nodule_contrast", "psnr", "psnr_from_mse", "quantize_8bit", "resize_bilinear",
    "score_pair", "ssim", "ImageFolder", "load_case", "LpipsScorer", "LpipsUnavailable", "build_lpips_net",
    "lpips_scorer", "lpips_unavailable_reason", "lpips_weights_path", "FolderReport", "evaluate", "score_folder",
    "csv_text", "markdown_table", "metric_columns", "summarize", "apply_tone_curve", "fit_from_folders",
    "fit_tone_curve", "write_tone_predictions",
]

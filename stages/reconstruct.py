"""Stage 1 evaluation as a library: reconstruct images of any size with a trained ML-VQGAN, score them,
report codebook use (what ``vq-gan_eval.py`` runs: :func:`reconstruct_images`; its command line:
:func:`build_parser`, :func:`config_for`).

Images are reconstructed at their native size: each is padded (edge replication) to a multiple of
the downsampling factor f, encoded, quantised, decoded and cropped back, then written with the
source's bit depth under ``--out`` (default ``<run>/eval/<split or folder name>/``), keeping the
split's sub-folders (CXR/, BS/ ...); a PNG or TIFF input gives an image of its own name and format,
a JPEG or DICOM input a PNG (``<stem>.png``). The output folder may not be an input folder (by any
path to it), and a file already there is not replaced without ``--overwrite``: both are refused
before any work. ``recon_metrics.csv`` holds per-image PSNR, SSIM and MS-SSIM
on [0, 1] and ``recon_summary.json`` their mean ± population std and the codebook usage
(perplexity, unused codes) over all images; the summary is also printed.

The config is the checkpoint's own (``--set`` may change data paths); the model is rebuilt from it.
Unreadable images are reported per file and skipped; the exit status is 1 if any image failed. A
full disk stops the run (what was written stays; exit status 3).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from tqdm import tqdm

from data.datasets import split_list
from data.io import ImageError, check_output_names, input_images, output_name, read_image, write_image
from data.transforms import from_model, to_model
from models import load_vqgan
from models.checkpoints import checkpoint_config
from models.msssim import MSSSIM
from models.vqgan import codebook_counts, usage_from_counts
from utils.atomic import atomic_write_text, json_text, refuse_input_folders, require_writable
from utils.cli import eval_parser, naming_file
from utils.config import Config
from utils.dist import resolve_device

STAGE = "vqgan"


@torch.no_grad()
def reconstruct(model, pixels: np.ndarray, invert: bool, device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    """Reconstruct one (H, W) [0, 1] image at native size; returns ([0, 1] image, code indices)."""
    f = model.downsample_factor
    x = to_model(pixels, invert)[None].to(device)                     # (1, 1, H, W)
    h, w = x.shape[-2:]
    pad = (0, (-w) % f, 0, (-h) % f)
    x_pad = F.pad(x, pad, mode="replicate") if any(pad) else x
    x_rec, _, info = model(x_pad)
    return from_model(x_rec[0, 0, :h, :w], invert), info["indices"].cpu()


def image_jobs(cfg: Config, split: str | None, input_dir: str | None) -> list[tuple[str, Path]]:
    """(relative output name, source path) for a split's CXR/BS images or a folder's images (the other
    entries of the folder are named on stderr, not silently dropped)."""
    if input_dir is not None:
        return [(p.name, p) for p in input_images(input_dir, "vq-gan_eval.py")]
    root = Path(cfg.data.root)
    names = split_list(cfg.data, split)
    return [(f"{sub}/{n}", root / sub / n) for sub in ("CXR", "BS") for n in names]


SUMMARY_FILES = ("recon_metrics.csv", "recon_summary.json")


def check_outputs(jobs: list[tuple[str, Path]], out_dir: Path, overwrite: bool) -> None:
    """The rules of ``ldm_eval.py``, checked before any work: no output folder is an input folder (by any
    path), no two inputs give one output name, and no existing file is replaced without ``overwrite``
    (pointed at a ground-truth folder, the run would replace the targets with reconstructions).

    Raises:
        ValueError: naming the folder or the files.
    """
    outputs = {out_dir, *(out_dir / Path(rel).parent for rel, _ in jobs)}
    refuse_input_folders(sorted(outputs), sorted({src.parent for _, src in jobs}))
    check_output_names([Path(rel) for rel, _ in jobs])
    if overwrite:
        return
    names = [out_dir / n for n in SUMMARY_FILES] + [out_dir / output_rel(rel) for rel, _ in jobs]
    existing = [f for f in names if f.exists() or f.is_symlink()]
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ValueError(f"{existing[0]}{more} already exist; choose an empty --out or pass --overwrite to replace them")


def output_rel(rel: str) -> str:
    """The output's path under ``--out`` for a job's relative name: the format rules of
    :func:`data.io.output_name` (a DICOM or JPEG input gives a PNG)."""
    return str(Path(rel).parent / output_name(rel))


def reconstruct_images(cfg: Config, ckpt: str | Path, split: str | None = "test", input_dir: str | None = None,
                       out_dir: str | Path | None = None, progress: bool = True, overwrite: bool = False) -> dict:
    """Reconstruct and score; return the summary dict (also written as recon_summary.json).

    Checked before the model is loaded (:func:`check_outputs`): the output folder is no input folder
    and nothing there is replaced unless ``overwrite``.
    """
    jobs = image_jobs(cfg, split, input_dir)
    if not jobs:
        raise ValueError(f"no images to evaluate ({input_dir or split})")
    if out_dir is None:
        run_dir = Path(ckpt).resolve().parent.parent
        out_dir = run_dir / "eval" / (Path(input_dir).name if input_dir else split)
    out_dir = Path(out_dir)
    check_outputs(jobs, out_dir, overwrite)
    require_writable(out_dir)
    device = resolve_device(cfg.run.device)
    model, ckpt_cfg = load_vqgan(ckpt, device)
    msssim = MSSSIM(data_range=1.0, reduction="none").to(device)
    counts = torch.zeros(model.num_embeddings, dtype=torch.long)
    rows, failures, stopped = [], [], None
    for rel, src in tqdm(jobs, desc="reconstruct", disable=not progress):
        try:
            img = read_image(src, cfg.data.max_pixels)
        except ImageError as e:
            failures.append({"name": rel, "error": e.reason})
            print(f"vq-gan_eval.py: {e}", file=sys.stderr)
            continue
        try:
            rec, indices = reconstruct(model, img.pixels, cfg.data.invert, device)
            write_image(out_dir / output_rel(rel), rec, bit_depth=16 if img.bit_depth > 8 else 8, inputs=(src,))
            mse = float(np.mean((rec.astype(np.float64) - img.pixels) ** 2))
            a, b = (torch.from_numpy(v)[None, None].float().to(device) for v in (rec, img.pixels))
            ms = float(msssim(a, b)[0]) if min(img.size) >= 16 else math.nan
            # SSIM's 7x7 window needs at least 7 pixels a side; smaller images get no SSIM, not an abort.
            ssim = float(structural_similarity(img.pixels, rec, data_range=1.0)) if min(img.size) >= 7 else math.nan
        except (ImageError, ValueError, RuntimeError) as e:
            msg = naming_file(src, e)
            failures.append({"name": rel, "error": msg})
            print(f"vq-gan_eval.py: {msg}", file=sys.stderr)
            if isinstance(e, ImageError) and e.disk_full:    # no later write can succeed: stop, keep what is written
                stopped = f"disk full: {e}"
                break
            continue
        counts += codebook_counts(indices, model.num_embeddings)
        rows.append({"name": rel, "height": img.size[0], "width": img.size[1],
                     "psnr": -10 * math.log10(mse) if mse > 0 else math.inf, "ssim": ssim, "msssim": ms})
    summary = {"checkpoint": str(ckpt), "images": len(jobs), "scored": len(rows), "failures": failures,
               "stopped": stopped,
               "codebook": {k: float(v) for k, v in usage_from_counts(counts).items()},
               "num_embeddings": model.num_embeddings}
    for key in ("psnr", "ssim", "msssim"):
        vals = np.array([r[key] for r in rows if math.isfinite(r[key])])
        summary[key] = {"mean": float(vals.mean()) if len(vals) else math.nan,
                        "std": float(vals.std()) if len(vals) else math.nan, "n": int(len(vals))}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["name", "height", "width", "psnr", "ssim", "msssim"])
    writer.writeheader()
    writer.writerows(rows)
    for name, text in (("recon_metrics.csv", buf.getvalue()), ("recon_summary.json", json_text(summary, indent=2) + "\n")):
        try:
            atomic_write_text(out_dir / name, text)
        except OSError as e:     # a full disk: one line, the images written stay
            print(f"vq-gan_eval.py: {out_dir / name}: not written ({e.strerror or e})", file=sys.stderr)
            summary["stopped"] = summary["stopped"] or f"{out_dir / name}: not written ({e.strerror or e})"
    if summary["stopped"]:
        print(f"vq-gan_eval.py: stopped, {summary['stopped']}; the reconstructions written are kept", file=sys.stderr)
    print(f"| {out_dir} | n = {len(rows)} of {len(jobs)} |\n|---|---|")
    for key, label in (("psnr", "PSNR (dB)"), ("ssim", "SSIM"), ("msssim", "MS-SSIM")):
        print(f"| {label} | {summary[key]['mean']:.4f} ± {summary[key]['std']:.4f} |")
    cb = summary["codebook"]
    print(f"codebook: perplexity {cb['perplexity']:.1f} of K = {model.num_embeddings}, "
          f"{int(cb['unused'])} unused codes")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = eval_parser("Evaluate an ML-VQGAN checkpoint.", "stage-1 checkpoint (step_*.pt or best.pt)",
                         "a folder of images instead of a split")
    parser.add_argument("--overwrite", action="store_true", help="replace outputs that already exist in --out")
    return parser


def config_for(args: argparse.Namespace):
    """The checkpoint's config (or --config files) with --set overrides."""
    return checkpoint_config(args.ckpt, STAGE, args.config, args.overrides)

"""Bone-suppression metrics: BSR, MSE, PSNR, SSIM and LPIPS, as the published tables compute them and corrected.

Usage:
    # the numbers of the GL-LCM / BS-LDM tables (docs/method.md §6.1), over the files of a test list
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

Modes (docs/method.md §6, §7 items 21-24):
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
import sys
from pathlib import Path
from typing import Sequence

from data.splits import read_list
from evaluation import MODES, ImageFolder, lpips_scorer, score_folder
from utils.atomic import UnwritableError, require_writable


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
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept --list names that are absolute or contain '..' (refused by default: they read "
                        "files outside --cxr/--gt/--pred)")
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
    try:
        names = read_list(args.list, args.allow_outside_root) if args.list else ImageFolder(args.gt).names()
    except (OSError, ValueError) as e:      # a duplicate, a name leaving the folders, an unreadable list
        parser.error(str(e))

    scorer, lpips_reason = lpips_scorer(args.device, args.batch_size)
    if lpips_reason:
        if args.require_lpips:
            print(f"metrics.py: LPIPS required but unavailable: {lpips_reason}", file=sys.stderr)
            return 2
        print(f"metrics.py: LPIPS not computed: {lpips_reason}", file=sys.stderr)

    def report_problem(name, why):
        print(f"metrics.py: {name}: {why}", file=sys.stderr)

    if not names:
        parser.error("nothing to score: the list / gt folder has no images")
    report = score_folder(args.cxr, args.gt, args.pred, names, args.mode, args.mask, args.native, scorer,
                          lpips_reason, args.list, report_problem)
    csv_path, json_path = report.write(args.out or args.pred)
    print(report.markdown())
    print(f"\nwrote {csv_path} and {json_path}")
    if report.failures:
        print(f"metrics.py: {len(report.failures)} of {len(report.rows)} images could not be scored (see above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a trained ML-VQGAN: reconstruct images of any size, score them, report codebook use.

Usage:
    python vq-gan_eval.py --ckpt runs/vqgan/000-demo/checkpoints/best.pt             # test split
    python vq-gan_eval.py --ckpt CKPT --split val --set data.root=/data/SZCH-X-Rays
    python vq-gan_eval.py --ckpt CKPT --input some/folder --out recon/

What it writes and its exit statuses: ``stages/reconstruct.py``.
"""
import sys

from stages.reconstruct import build_parser, config_for, reconstruct_images
from utils.cli import entry_point


@entry_point()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = reconstruct_images(config_for(args), args.ckpt, split=args.split, input_dir=args.input_dir,
                                 out_dir=args.out_dir, progress=args.progress, overwrite=args.overwrite)
    return 3 if summary["stopped"] else 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

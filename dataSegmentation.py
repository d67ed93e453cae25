"""Validate a paired dataset folder and write a seeded train/val/test split (docs/method.md §1.3–§1.4).

Usage:
    python dataSegmentation.py --config configs/szch.yaml                   # scan, report, split
    python dataSegmentation.py --config configs/demo.yaml --synthetic --force   # phantoms first
    python dataSegmentation.py --config configs/szch.yaml --set data.split.seed=7 --force
    python dataSegmentation.py --config configs/szch.yaml --masks auto       # masks for GL-LCM
    python dataSegmentation.py --config configs/demo.yaml --from-ct --force  # pairs projected from a chest CT
    python dataSegmentation.py --config configs/demo.yaml --from-ct chest.nii.gz --bone-labels seg/ --views 400

What the scan checks, the report, masks, masked copies and the split: ``stages/dataset.py``; the CT
projections: ``data/ct.py`` and docs/ct_data.md.
"""
import sys

from stages.dataset import build_parser, config_for, prepare_dataset
from utils.cli import entry_point


@entry_point()
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    prepare_dataset(config_for(args), synthetic=args.synthetic, force=args.force, strict=args.strict,
                    masked=args.masked, masks=args.masks, from_ct=args.from_ct is not None)


if __name__ == "__main__":
    sys.exit(main())

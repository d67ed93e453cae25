"""Render docs/generated/figures/ct_pairs.png: two views of a CT-projected dataset (a held-out test view
and the most rotated training view), each as CXR | soft tissue | bone (CXR − soft tissue) | lung mask.

The images are the dataset's own 8-bit files, shown at native pixels (no resampling), so the figure
is what the models see. The Bone/ panel is the file written by the generator (the signed bone layer
mapped from [−0.10, 0.50] to [0, 1]).

Usage (from the repository root, after `make data` or `make demo`):
    python -m tools.make_ct_figure              # datasets/demo -> docs/generated/figures/ct_pairs.png
    python -m tools.make_ct_figure --data datasets/ct_case01 --out ct_case01.png
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PANELS = (("CXR", "CXR"), ("BS", "soft tissue (BS)"), ("Bone", "bone = CXR - BS"), ("Mask", "lung mask"))


def pick_views(rows: list[dict]) -> list[dict]:
    """The first test view and the training view with the largest |rotation| (views.csv rows)."""
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]
    if not test or not train:
        raise ValueError("views.csv needs at least one test and one train view")
    return [test[0], max(train, key=lambda r: abs(float(r["rotation_deg"])))]


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO / "datasets" / "demo",
                   help="a dataset written by dataSegmentation.py --from-ct (holds views.csv)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "generated" / "figures" / "ct_pairs.png")
    args = p.parse_args(argv)
    views = args.data / "views.csv"
    if not views.is_file():
        p.error(f"--data {args.data}: no views.csv (write the dataset with dataSegmentation.py --from-ct)")

    import numpy as np
    from PIL import Image, ImageDraw

    from data.io import ImageError, read_image, to_uint
    from utils.atomic import atomic_write

    with open(views, newline="") as f:
        try:
            picks = pick_views(list(csv.DictReader(f)))
        except (KeyError, ValueError) as e:
            p.error(f"{views}: {e}")
    try:
        rows = [np.concatenate([to_uint(read_image(args.data / sub / r["name"]).pixels) for sub, _ in PANELS], axis=1)
                for r in picks]
    except ImageError as e:
        p.error(str(e))
    img = Image.fromarray(np.concatenate(rows, axis=0)).convert("RGB")
    draw, h, w = ImageDraw.Draw(img), rows[0].shape[0], rows[0].shape[1] // len(PANELS)
    for i, r in enumerate(picks):
        draw.text((4, 4 + h * i), f"{r['name']} {r['split']}: rotation {float(r['rotation_deg']):.1f} deg, "
                  f"tilt {float(r['tilt_deg']):.1f} deg", fill=(255, 200, 0))
    for j, (_, title) in enumerate(PANELS):
        draw.text((4 + w * j, h - 12), title, fill=(255, 200, 0))
    atomic_write(args.out, lambda tmp: img.save(tmp, format="PNG"))
    print(f"wrote {args.out}", file=sys.stderr)
    return args.out


if __name__ == "__main__":
    main()

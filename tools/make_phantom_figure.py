"""Render docs/generated/figures/phantom_vs_real.png: a real SZCH pair next to a synthetic phantom.

Top row: real pair 0 (CXR | soft tissue | CXR - soft tissue). Bottom row: one phantom (CXR | soft
tissue target | bone = CXR - soft tissue). Both difference images share one gray scale, so their
contrast can be compared directly.

Usage (from the repository root):
    python -m tools.make_phantom_figure --real /path/to/szch-samples
    python -m tools.make_phantom_figure --real /path/to/szch-samples --seed 3 --size 1024 \
        --out docs/generated/figures/phantom_vs_real.png
    python -m tools.make_phantom_figure --real /path/to/szch-samples --name 1.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIFF_RANGE = (-0.1, 0.4)  # gray scale of both difference panels, in [0, 1] pixel units


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", type=Path, required=True,
                   help="folder (outside this repository) with CXR/ and BS/ sub-folders of real pairs")
    p.add_argument("--name", default="0.png", help="file name of the real pair")
    p.add_argument("--seed", type=int, default=0, help="phantom seed")
    p.add_argument("--size", type=int, default=1024, help="phantom size in pixels")
    p.add_argument("--dpi", type=int, default=80)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "generated" / "figures" / "phantom_vs_real.png")
    args = p.parse_args(argv)
    for sub in ("CXR", "BS"):
        if args.real is not None and not (args.real / sub).is_dir():
            p.error(f"--real {args.real}: no {sub}/ folder of real images there")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from utils.logging import pyplot, save_figure

    plt = pyplot()

    from data.io import read_image
    from data.phantom import generate_phantom

    cxr = read_image(args.real / "CXR" / args.name).pixels
    bs = read_image(args.real / "BS" / args.name).pixels
    ph = generate_phantom(args.seed, args.size)
    rows = [
        (f"real pair {args.name}", (cxr, bs, cxr - bs),
         ("CXR", "soft tissue (DES)", "CXR − soft tissue")),
        (f"phantom seed {args.seed}, {args.size}²", (ph.cxr, ph.bs, ph.bone),
         ("CXR", "soft-tissue target", "bone = CXR − soft tissue")),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 10.4), dpi=args.dpi)
    for r, (label, images, titles) in enumerate(rows):
        for c, (img, title) in enumerate(zip(images, titles)):
            vmin, vmax = DIFF_RANGE if c == 2 else (0.0, 1.0)
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="lanczos")
            ax.set_title(f"{label}: {title}", fontsize=11)
            ax.axis("off")
    fig.suptitle("Synthetic phantom (data/phantom.py) vs a real SZCH pair; difference panels "
                 f"shown on [{DIFF_RANGE[0]}, {DIFF_RANGE[1]}]", fontsize=12)
    fig.tight_layout()
    save_figure(fig, args.out, dpi=args.dpi)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

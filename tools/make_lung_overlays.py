"""Render docs/generated/figures/lung_masks.png: the lung segmenter of data/lungseg.py on real and phantom CXRs.

Panels: the two real SZCH samples (CXR/0.png, CXR/1.png), the real CR DICOM RG1_UNCR.dcm from
pydicom-data (15-bit MONOCHROME1, inverted on read: bones bright), and synthetic phantoms. The
automatic mask is outlined in red; on the phantoms the ground-truth lungs are dashed green and the
title gives the Dice score. Titles give the lung area as a fraction of the image.

Usage (from the repository root):
    python -m tools.make_lung_overlays --real /path/to/szch-samples
    python -m tools.make_lung_overlays --seeds 0 3 --size 256 --out docs/generated/figures/lung_masks.png
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PANEL_PX = 512  # display size of the long side of each panel


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", type=Path, default=None,
                   help="folder (outside this repository) with a CXR/ sub-folder of real radiographs")
    p.add_argument("--names", nargs="+", default=["0.png", "1.png"], help="files in CXR/")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 3, 20],
                   help="phantom seeds (20 is the worst of seeds 0-49)")
    p.add_argument("--size", type=int, default=256, help="phantom size in pixels")
    p.add_argument("--dpi", type=int, default=80)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "generated" / "figures" / "lung_masks.png")
    args = p.parse_args(argv)
    for sub in ("CXR",):
        if args.real is not None and not (args.real / sub).is_dir():
            p.error(f"--real {args.real}: no {sub}/ folder of real images there")
    return args


def load_cases(args) -> list[tuple]:
    """[(title, pixels float (H, W) in [0, 1], ground-truth bool (H, W) or None)].

    Missing inputs (real samples, pydicom-data) are skipped with a message.
    """
    from data.io import read_image
    from data.phantom import generate_phantom

    cases = []
    if args.real is None:
        print("no --real DIR: the figure shows the DICOM and the phantoms only")
    for name in args.names if args.real is not None else []:
        path = args.real / "CXR" / name
        if path.exists():
            cases.append((f"SZCH CXR/{name}", read_image(path).pixels, None))
        else:
            print(f"skipping {path}: not found")
    try:
        from pydicom.data import get_testdata_file
        dcm = get_testdata_file("RG1_UNCR.dcm", download=False)
    except ImportError:
        dcm = None
    if dcm:
        cases.append(("RG1_UNCR.dcm (raw CR)", read_image(dcm).pixels, None))
    else:
        print("skipping RG1_UNCR.dcm: pydicom-data not installed")
    for seed in args.seeds:
        ph = generate_phantom(seed, args.size)
        cases.append((f"phantom seed {seed}", ph.cxr, ph.mask))
    return cases


def main(argv=None) -> None:
    args = parse_args(argv)
    from utils.logging import pyplot, save_figure

    plt = pyplot()
    from skimage.exposure import equalize_hist
    from skimage.transform import resize

    from data.lungseg import mask_report, segment_lungs

    cases = load_cases(args)
    ncol = 3
    nrow = -(-len(cases) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.0 * ncol, 5.6 * nrow), dpi=args.dpi,
                             squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.axis("off")
    for ax, (title, pixels, truth) in zip(axes.flat, cases):
        t0 = time.perf_counter()
        mask = segment_lungs(pixels)
        dt = time.perf_counter() - t0
        report = mask_report(mask)
        # Draw on a reduced copy: the figure stays small and contours stay crisp.
        scale = PANEL_PX / max(pixels.shape)
        shape = (round(pixels.shape[0] * scale), round(pixels.shape[1] * scale))
        # Equalised for display only: the raw CR is too flat to judge the mask otherwise.
        show = equalize_hist(resize(pixels, shape, anti_aliasing=scale < 1))
        ax.imshow(show, cmap="gray", vmin=0, vmax=1)
        ax.contour(resize(mask.astype(float), shape), levels=[0.5], colors="red", linewidths=1.2)
        label = f"{title}\nlungs {report['fraction']:.1%} of image, {report['n_components']} parts"
        if truth is not None:
            ax.contour(resize(truth.astype(float), shape), levels=[0.5], colors="lime",
                       linewidths=1.0, linestyles="dashed")
            dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
            label += f", Dice {dice:.3f}"
        ax.set_title(label, fontsize=10)
        ax.axis("off")
        print(f"{title}: {pixels.shape[1]}x{pixels.shape[0]}, {dt:.2f} s, "
              + ", ".join(f"{c['side']} {c['fraction']:.3f}" for c in report["components"]))
    fig.suptitle("Automatic lung masks (data/lungseg.py, no trained weights): red = mask, "
                 "dashed green = phantom ground truth; images histogram-equalised for display",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    save_figure(fig, args.out, dpi=args.dpi)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

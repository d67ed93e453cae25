"""Render docs/generated/figures/bone_spectrum.png: how the bone image (CXR - soft tissue) splits its
energy across frequency bands, on the real SZCH pairs and on the demo phantoms, bands relative to the width.

Each bar is the share of the bone image's energy in one band of ``evaluation.band_energies`` ("tone" is
everything coarser than a Gaussian of sigma = W/4, "fine" everything finer than W/128). Real pairs
are area-resized to the phantoms' size first, so both are compared at the demo's native 256².

Usage (from the repository root; DIR holds CXR/ and BS/ of registered real pairs):
    python -m tools.make_bone_spectrum_figure --real DIR
    python -m tools.make_bone_spectrum_figure --real DIR --phantoms 32 --size 256 \
        --out docs/generated/figures/bone_spectrum.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", type=Path, required=True, help="folder with CXR/ and BS/ of real pairs")
    p.add_argument("--phantoms", type=int, default=16, help="number of demo phantoms (dataset seed 0)")
    p.add_argument("--size", type=int, default=256, help="phantom size = size the real pairs are resized to")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "generated" / "figures" / "bone_spectrum.png")
    args = p.parse_args(argv)
    for sub in ("CXR", "BS"):
        if args.real is not None and not (args.real / sub).is_dir():
            p.error(f"--real {args.real}: no {sub}/ folder of real images there")
    import numpy as np
    from skimage.transform import resize

    from data.io import list_images, read_image
    from evaluation import mean_band_energies
    from data.phantom import case_seed, generate_phantom
    from utils.logging import pyplot, save_figure

    files = list_images(args.real / "CXR", must_exist=True)
    real = [resize(read_image(f).pixels.astype(np.float64) - read_image(args.real / "BS" / f.name).pixels,
                   (args.size, args.size), anti_aliasing=True) for f in files]
    phantom = [generate_phantom(case_seed(0, i), args.size).bone for i in range(args.phantoms)]
    r, q = mean_band_energies(real), mean_band_energies(phantom)
    bands = list(r)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=100)
    x = np.arange(len(bands))
    ax.bar(x - 0.2, [r[b] for b in bands], 0.4, label=f"real SZCH pairs (n = {len(real)}), resized to {args.size}²")
    ax.bar(x + 0.2, [q[b] for b in bands], 0.4, label=f"phantoms (n = {args.phantoms}), {args.size}²")
    for i, b in enumerate(bands):
        ax.text(i, max(r[b], q[b]) + 0.01, f"×{q[b] / r[b]:.2f}", ha="center", fontsize=8)
    ax.set_xticks(x, bands, fontsize=8)
    ax.set_ylabel("share of the bone image's energy")
    ax.set_title("Bone image (CXR − soft tissue) per frequency band, σ relative to the width W", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, args.out, bbox_inches="tight")
    print(args.out, {b: (round(r[b], 3), round(q[b], 3)) for b in bands})


if __name__ == "__main__":
    main()

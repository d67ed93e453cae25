"""Figure of one demo test image through the global-local path: CXR | global | local | fused | target.

Usage (after `make demo`):
    python -m tools.make_global_local_figure --ckpt runs/demo/ldm/001-distill/checkpoints/best.pt \
        --out docs/generated/figures/global_local.png
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(ckpt: str, out: str, index: int = 0) -> None:
    from data.datasets import split_list
    from data.io import read_image
    from utils.logging import pyplot, save_figure
    from stages.suppress import eval_config, suppress_images

    cfg = eval_config(ckpt)
    name = split_list(cfg.data, "test")[index]
    work = Path(ckpt).resolve().parent.parent / "eval" / "figure"
    suppress_images(cfg, ckpt, split="test", out_dir=work, save_paths=True, overwrite=True, progress=False)
    root = Path(cfg.data.root)
    panels = [("CXR", read_image(root / "CXR" / name).pixels),
              ("global path", read_image(work / "paths" / "global" / name).pixels),
              ("local path (lungs)", read_image(work / "paths" / "local" / name).pixels),
              ("fused, native size", read_image(work / name).pixels),
              ("target (soft tissue)", read_image(root / "BS" / name).pixels)]
    fig, axes = pyplot().subplots(1, len(panels), figsize=(3 * len(panels), 3.3), dpi=90)
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"demo test image {name}: distilled student, 4 LCM steps", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)
    print(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", default="docs/generated/figures/global_local.png")
    p.add_argument("--index", type=int, default=0, help="which test image")
    a = p.parse_args()
    main(a.ckpt, a.out, a.index)

"""Render docs/generated/figures/tradeoff.png: the teacher's high-pass BSR (sigma = W/32) on the demo test
split against the CPU minutes its two trainings (VQGAN + latent diffusion teacher) take on a 2-core CPU.

The quality figures were measured with this repository's trainers and ldm_eval.py (50 DDIM steps,
global-local, 27 test images of configs/demo.yaml's phantoms) on an NVIDIA H200 lent to one task,
because a sweep of this size does not fit a CPU session; they are the same iterations a CPU run
does. The minutes are those iterations times the per-iteration costs measured on the 2-core Intel
Xeon in `make demo` (VQGAN f = 4 0.25 s, UNet on 4x32² latents 0.17 s) and in short runs for the
f = 2 first stage (VQGAN 1.6x, UNet on 4x64² latents 2.7x those). The demo's own points were measured
end to end on the CPU. docs/results.md, "Where the ribs survive", has the tables.

Usage (from the repository root): python -m tools.make_tradeoff_figure
"""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VQ_S, UNET_S = 0.25, 0.17          # s per iteration, f = 4 first stage, 4x32² latents
# (label, VQGAN iterations, teacher iterations, cost factors (VQGAN, UNet), W/32 input ref., W/32 decoded ref.)
RUNS = [("VQGAN 408", 408, 1020, (1, 1), 0.049, -0.006), ("VQGAN 408", 408, 2040, (1, 1), 0.121, 0.061),
        ("VQGAN 408", 408, 4080, (1, 1), 0.159, 0.086),
        ("VQGAN 816", 816, 1020, (1, 1), 0.321, 0.197), ("VQGAN 816", 816, 2040, (1, 1), 0.406, 0.279),
        ("VQGAN 816", 816, 4080, (1, 1), 0.441, 0.306),
        ("f = 2, VQGAN 408", 408, 1020, (1.6, 2.7), 0.336, 0.221), ("f = 2, VQGAN 408", 408, 2040, (1.6, 2.7), 0.463, 0.352)]
TRAINING_BUDGET_MIN = 12.0         # 15 minutes minus the other stages of make demo (about 3 minutes here)


def main(out: Path = REPO / "docs" / "generated" / "figures" / "tradeoff.png") -> None:
    from utils.logging import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, label in enumerate(dict.fromkeys(r[0] for r in RUNS)):
        pts = [r for r in RUNS if r[0] == label]
        x = [(vq * VQ_S * fv + t * UNET_S * fu) / 60 for _, vq, t, (fv, fu), _, _ in pts]
        ax.plot(x, [p[4] for p in pts], "o-", color=f"C{i}", label=f"{label}, input reference")
        ax.plot(x, [p[5] for p in pts], "s--", color=f"C{i}", alpha=0.6, label=f"{label}, decoded reference")
        for xi, p in zip(x, pts):
            ax.annotate(f"{p[2]:,}", (xi, p[4]), textcoords="offset points", xytext=(3, 4), fontsize=7)
    # make demo (configs/demo.yaml), measured end to end on the CPU: its two trainings took 197 + 288 s
    ax.plot([8.1], [0.229], "k*", ms=12, label="make demo: teacher, 1,530 it. (decoded, 50 DDIM)")
    ax.plot([8.1], [0.259], "m*", ms=12, label="make demo: 4-step student (decoded)")
    ax.plot([8.1], [0.373], "c*", ms=12, label="make demo: 4-step student (input)")
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.text(4.2, 0.51, "goal for the student: 0.5", fontsize=8)
    ax.axvline(TRAINING_BUDGET_MIN, color="r", lw=0.8, ls=":")
    ax.text(TRAINING_BUDGET_MIN + 0.2, 0.02, "training time left\nin 15 minutes", fontsize=8, color="r")
    ax.set_xlabel("CPU minutes of VQGAN + teacher training (2-core Intel Xeon; labels: teacher iterations)")
    ax.set_ylabel("teacher, high-pass BSR at W/32")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(fig, out, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "generated" / "figures" / "tradeoff.png")
    main(parser.parse_args().out)

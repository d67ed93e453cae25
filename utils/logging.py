"""Run folders, rank-0 logging, CSV scalars, loss-curve plots and PNG image grids."""
from __future__ import annotations

import csv
import io
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch

from utils.atomic import atomic_write


def make_run_dir(out_dir: str | Path, stage: str, name: str) -> Path:
    """Create ``<out_dir>/<stage>/<NNN>-<name>`` with the next free number."""
    base = Path(out_dir) / stage
    base.mkdir(parents=True, exist_ok=True)
    nums = [int(m.group(1)) for p in base.iterdir() if (m := re.match(r"(\d{3})-", p.name))]
    run = base / f"{max(nums, default=-1) + 1:03d}-{name}"
    run.mkdir()
    return run


def get_logger(run_dir: str | Path | None, is_main: bool = True, name: str = "bonesup") -> logging.Logger:
    """stdout + ``run_dir/log.txt`` on rank 0; silent elsewhere."""
    logger = logging.getLogger(f"{name}.{run_dir}")
    logger.handlers.clear()
    logger.propagate = False
    if not is_main:
        logger.addHandler(logging.NullHandler())
        return logger
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(Path(run_dir) / "log.txt"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    return logger


class CSVLogger:
    """Append rows of scalars to a CSV file; new keys extend the header (the file is rewritten)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.is_file():  # resume: keep what was logged before
            with open(self.path, newline="") as f:
                self.rows = list(csv.DictReader(f))

    def log(self, row: dict) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(buf.getvalue()))

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run re-logs them)."""
        self.rows = [r for r in self.rows if int(float(r.get("step", 0))) <= step]


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures go to files only, no window is ever opened."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig_kwargs) -> None:
    """Write ``fig`` as a PNG atomically and close it (``savefig_kwargs``: e.g. dpi, bbox_inches)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs))
    pyplot().close(fig)


def plot_curves(csv_path: str | Path, png_path: str | Path, keys: list[str] | None = None, title: str = "") -> None:
    """Plot numeric columns of a CSV log against ``step`` (log-scaled y where positive)."""
    plt = pyplot()

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    keys = keys or [k for k in rows[0] if k not in ("step", "epoch", "split", "lr")]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in keys:
        pts = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, marker="." if len(pts) < 30 else None)
    ax.set_xlabel("step")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, png_path)


def save_grid(path: str | Path, columns: list[torch.Tensor], value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
    """Write a PNG grid: one row per batch element, one column per tensor of shape (B, 1, H, W).

    Values are mapped from ``value_range`` to [0, 255]; an error map column can be passed already
    scaled into that range.
    """
    from PIL import Image

    lo, hi = value_range
    cols = [((c.detach().float().cpu().clamp(lo, hi) - lo) / (hi - lo)) for c in columns]
    rows = [torch.cat([c[i, 0] for c in cols], dim=1) for i in range(cols[0].shape[0])]
    grid = (torch.cat(rows, dim=0).numpy() * 255).round().astype(np.uint8)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))

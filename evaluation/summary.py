"""Summaries of scored rows: mean and population std per metric, the markdown table, the CSV text."""
from __future__ import annotations

import csv
import io
import math
from typing import Sequence

import numpy as np

from evaluation.definitions import CORRECTED_METRICS, FAITHFUL_METRICS, LABELS, LUNG_METRICS


def metric_columns(mode: str, with_mask: bool = False) -> tuple[str, ...]:
    """Metric column names of ``mode`` (lung columns with a mask)."""
    return (FAITHFUL_METRICS if mode == "faithful" else CORRECTED_METRICS) + (LUNG_METRICS if with_mask else ())


def summarize(rows: list[dict], columns: Sequence[str]) -> dict[str, dict]:
    """Per metric: mean and population std (ddof 0) over the finite values of the scored rows.

    +inf (PSNR of an identical pair) and NaN (empty mask, zero bone image) are left out of mean
    and std and counted in ``n_inf`` / ``n_nan``; ``n`` is the number of values averaged.
    """
    out = {}
    for c in columns:
        vals = np.array([r[c] for r in rows if r["status"] == "ok" and r[c] is not None], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        out[c] = {"mean": float(finite.mean()) if finite.size else None,
                  "std": float(finite.std(ddof=0)) if finite.size else None,
                  "n": int(finite.size), "n_inf": int(np.isinf(vals).sum()), "n_nan": int(np.isnan(vals).sum())}
    return out


def markdown_table(stats: dict[str, dict], n_scored: int, n_listed: int, mode: str, size: str,
                   lpips_reason: str | None = None) -> str:
    """The summary as a markdown table (BSR in %, MSE in 10⁻³, 3 decimals as in the paper tables)."""
    lines = ["| metric | mean ± std |", "| --- | --- |"]
    for c, s in stats.items():
        label, scale = LABELS[c]
        if c == "lpips" and lpips_reason:
            cell = "unavailable (weights missing, see stderr)"
        elif s["mean"] is None:
            cell = "n/a"
        else:
            cell = f"{s['mean'] * scale:.3f} ± {s['std'] * scale:.3f}"
            extra = [f"{s['n_inf']} × inf" if s["n_inf"] else "", f"{s['n_nan']} × NaN" if s["n_nan"] else ""]
            if any(extra):
                cell += f" ({', '.join(e for e in extra if e)} excluded)"
        lines.append(f"| {label} | {cell} |")
    lines.append("")
    lines.append(f"{n_scored} of {n_listed} images scored ({mode} mode, {size}; std = population std).")
    return "\n".join(lines)


def csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.10g}")
        return str(v)

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = ["name", "status", "error", "height", "width", *columns]
    writer.writerow(header)
    for r in rows:
        writer.writerow([cell(r[h]) for h in header])
    return buf.getvalue()

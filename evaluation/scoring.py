"""Scoring a prediction folder against its targets: per-image rows, the summary report, its files.

    report = score_folder(cxr_dir, gt_dir, pred_dir, names, mode="corrected", mask_dir=masks, native=True,
                          scorer=scorer)
    report.summary["metrics"]["bsr_hp32"]["mean"]; report.failures; print(report.markdown())
    report.write(out_dir)          # metrics_<tag>.csv and metrics_<tag>.json, atomically

``metrics.py`` is the command line over these functions.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from data.masking import binarize_mask
from evaluation.definitions import MODES, REFERENCE_SIZE, score_pair
from evaluation.pairing import ImageFolder, load_case
from evaluation.perceptual import LpipsScorer, lpips_weights_path
from evaluation.summary import csv_text, markdown_table, metric_columns, summarize
from utils.atomic import atomic_write_text, json_text


def evaluate(names: Iterable[str], cxr_dir: str | os.PathLike, gt_dir: str | os.PathLike,
             pred_dir: str | os.PathLike, mode: str = "faithful", mask_dir: str | os.PathLike | None = None,
             native: bool = False, scorer: LpipsScorer | None = None,
             on_problem: Callable[[str, str], None] | None = None, progress: bool = True) -> list[dict]:
    """Score every named case; failed ones become rows with status "failed" and the reason.

    Args:
        names: file names (or stems) present in the gt folder.
        mode, native: see :func:`evaluation.definitions.score_pair`; mask_dir: lung masks (corrected mode).
        scorer: LPIPS scorer; None leaves the "lpips" column empty.
        on_problem: called as on_problem(name, reason) for each case that cannot be scored.
        progress: a progress bar on stderr.
    Returns:
        One dict per name, in order: name, status ("ok" / "failed"), error, height, width and the
        metric columns (float, NaN / inf possible; None when not computed).
    """
    folders = {"cxr": ImageFolder(cxr_dir), "gt": ImageFolder(gt_dir), "prediction": ImageFolder(pred_dir)}
    if mask_dir is not None:
        folders["mask"] = ImageFolder(mask_dir)
    columns = metric_columns(mode, mask_dir is not None)
    size = None if native else (REFERENCE_SIZE, REFERENCE_SIZE)
    rows: list[dict] = []
    pending: list[tuple[dict, np.ndarray, np.ndarray]] = []  # LPIPS waits for a full batch

    def flush():
        if pending and scorer is not None:
            values = scorer([p[1] for p in pending], [p[2] for p in pending], mode)
            for (row, _, _), v in zip(pending, values):
                row["lpips"] = float(v)
        pending.clear()

    for name in _progress(list(names), progress):
        row = {"name": name, "status": "ok", "error": "", "height": None, "width": None}
        row.update({c: None for c in columns})
        rows.append(row)
        arrays, problems = load_case(name, folders)
        if not problems:
            try:
                mask = binarize_mask(arrays["mask"]) if "mask" in arrays else None
                values, gt_s, pred_s = score_pair(arrays["cxr"], arrays["gt"], arrays["prediction"],
                                                  mode, mask, size)
            except ValueError as e:  # a mask of a third size
                problems.append(str(e))
        if problems:
            row.update(status="failed", error="; ".join(problems))
            if on_problem is not None:
                on_problem(name, row["error"])
            continue
        row["height"], row["width"] = arrays["gt"].shape
        row.update(values)
        if scorer is not None:
            if pending and pending[-1][1].shape != gt_s.shape:  # native sizes differ: new batch
                flush()
            pending.append((row, gt_s.astype(np.float32), pred_s.astype(np.float32)))
            if len(pending) >= scorer.batch_size:
                flush()
    flush()
    return rows


def _progress(items: list, enabled: bool) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="metrics", unit="img", disable=None if enabled else True, file=sys.stderr)


@dataclass
class FolderReport:
    """The scores of one prediction folder in one mode.

    Attributes:
        rows: one dict per listed image (see :func:`evaluate`).
        columns: the metric columns of ``mode``.
        summary: what ``metrics_<tag>.json`` holds: mode, size, counts, per-metric statistics
            (:func:`evaluation.summary.summarize`), LPIPS availability, failures, inputs.
    """

    rows: list[dict]
    columns: tuple[str, ...]
    summary: dict

    @property
    def tag(self) -> str:
        """File-name tag: the mode, plus ``_native`` at native resolution."""
        return self.summary["mode"] + ("_native" if self.summary["size"] == "native" else "")

    @property
    def failures(self) -> list[dict]:
        return self.summary["failures"]

    @property
    def metrics(self) -> dict[str, dict]:
        return self.summary["metrics"]

    def markdown(self) -> str:
        s = self.summary
        return markdown_table(s["metrics"], s["n_scored"], s["n_listed"], s["mode"], s["size"], s["lpips"]["reason"])

    def transcript(self, out_dir: str | os.PathLike, prog: str = "metrics.py") -> str:
        """What ``metrics.py`` prints for this report, stderr lines in their place: the LPIPS note,
        one line per failed image, the table, the files written to ``out_dir``, the failure count."""
        reason = self.summary["lpips"]["reason"]
        lines = [f"{prog}: LPIPS not computed: {reason}"] if reason else []
        lines += [f"{prog}: {f['name']}: {f['error']}" for f in self.failures]
        csv_path, json_path = self.paths(out_dir)
        lines += [self.markdown(), "", f"wrote {csv_path} and {json_path}"]
        if self.failures:
            lines.append(f"{prog}: {len(self.failures)} of {len(self.rows)} images could not be scored (see above)")
        return "\n".join(lines) + "\n"

    def paths(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """(csv, json) paths of this report in ``out_dir``."""
        out = Path(out_dir)
        return out / f"metrics_{self.tag}.csv", out / f"metrics_{self.tag}.json"

    def write(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``metrics_<tag>.csv`` (one row per listed image) and ``metrics_<tag>.json`` (the
        summary) atomically; returns their paths."""
        csv_path, json_path = self.paths(out_dir)
        atomic_write_text(csv_path, csv_text(self.rows, self.columns))
        atomic_write_text(json_path, json_text(self.summary, indent=2, ensure_ascii=False) + "\n")
        return csv_path, json_path


def score_folder(cxr_dir: str | os.PathLike, gt_dir: str | os.PathLike, pred_dir: str | os.PathLike,
                 names: list[str] | None = None, mode: str = "faithful", mask_dir: str | os.PathLike | None = None,
                 native: bool = False, scorer: LpipsScorer | None = None, lpips_reason: str | None = None,
                 list_file: str | os.PathLike | None = None,
                 on_problem: Callable[[str, str], None] | None = None, progress: bool = True) -> FolderReport:
    """Score a prediction folder and return its report (nothing is written; see :meth:`FolderReport.write`).

    Args:
        cxr_dir, gt_dir, pred_dir: the input radiographs, the soft-tissue targets, the predictions.
        names: the cases to score (file names or stems); None: every image of ``gt_dir``, so that a
            missing prediction is reported rather than silently skipped.
        mode: "faithful" (the published tables) or "corrected"; mask_dir, native: corrected mode only.
        scorer: LPIPS (:func:`evaluation.perceptual.lpips_scorer`); None leaves LPIPS out and
            ``lpips_reason`` says why in the summary.
        list_file: the split list the names came from, recorded in the summary's inputs.
        on_problem, progress: see :func:`evaluate`.
    Raises:
        ValueError: no names to score, or mask/native options in faithful mode.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "faithful" and (mask_dir is not None or native):
        raise ValueError("mask and native are corrected-mode options (the published metrics have neither)")
    if names is None:
        names = ImageFolder(gt_dir).names()
    if not names:
        raise ValueError("nothing to score: the list / gt folder has no images")
    rows = evaluate(names, cxr_dir, gt_dir, pred_dir, mode, mask_dir, native, scorer, on_problem, progress)
    columns = metric_columns(mode, mask_dir is not None)
    failures = [{"name": r["name"], "error": r["error"]} for r in rows if r["status"] != "ok"]
    summary = {
        "mode": mode,
        "size": "native" if native else f"{REFERENCE_SIZE}x{REFERENCE_SIZE}",
        "n_listed": len(rows),
        "n_scored": len(rows) - len(failures),
        "n_failed": len(failures),
        "metrics": summarize(rows, columns),
        "lpips": {"available": scorer is not None, "reason": None if scorer is not None else lpips_reason,
                  "network": "AlexNet, v0.1 (lpips package)",
                  "input_range": "[0, 1], 1 channel (as published)" if mode == "faithful" else "[-1, 1], 3 channels",
                  "weights": str(lpips_weights_path()),
                  "device": str(scorer.device) if scorer is not None else None},
        "psnr_identical": "inf per image; excluded from mean/std, counted in n_inf",
        "failures": failures,
        "inputs": {k: None if v is None else str(v) for k, v in
                   (("cxr", cxr_dir), ("gt", gt_dir), ("pred", pred_dir), ("list", list_file), ("mask", mask_dir))},
    }
    return FolderReport(rows, columns, summary)

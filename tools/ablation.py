"""Ablation runner: the published ablations of a trained model, each row a real ldm_eval.py + metrics.py run.

Usage:
    python -m tools.ablation --ckpt runs/demo/ldm/001-distill/checkpoints/best.pt --out docs/generated/ablation \
        --work runs/demo/ablation
    python -m tools.ablation --ckpt offset=runs/ldm/000-szch/checkpoints/best.pt \
        --ckpt no-offset=runs/ldm/001-szch-nooffset/checkpoints/best.pt --tables offset_tat --out runs/ablation
    python -m tools.ablation --ckpt CKPT --tables sampler --samplers lcm ddim ddpm --steps 1 2 4 8 50 --limit 20 --out DIR
    python -m tools.ablation --ckpt CKPT --out DIR --dry-run          # print the plan and the commands, run nothing

Tables (``--tables``, default all), in the format of the papers (mean ± population std per metric):

``offset_tat``  BS-LDM's ablation: offset noise ✓/✗ × temporal adaptive thresholding ✓/✗
                (``sampler.clip``), with intensity histograms of prediction vs target per row
                (``figures/offset_tat_histograms.png``). Offset noise is a *training* setting
                (``diffusion.offset_noise``): give one ``--ckpt label=path`` per model, e.g. one trained
                with ``--set diffusion.offset_noise=0``. With a single checkpoint the table has the two
                TAT rows of that model only.
``guidance``    GL-LCM's guidance ablation (docs/method.md §5.2): ``global_local.leg_mode`` none (vanilla),
                noise (CFG-style with a noise reference, the released code), global_pred and
                global_cond (LEG against the global prediction / the global condition).
``fusion``      GL-LCM's fusion ablation (§5.3): ``global_local.fusion`` none (the global path),
                alpha, poisson. AE fusion is not implemented (§5.4).
``sampler``     ``sampler.name`` × ``sampler.steps`` (``--samplers``, ``--steps``), with seconds per image.

Every table ends with two baseline rows scored on the same images: the tone curve (one global
lookup table CXR -> soft tissue, fitted on the train split) and the identity (prediction = CXR).
In corrected mode the columns include the high-pass BSR (σ = width/32, width/64), the score a
tone change cannot raise.

The inference-time tables use the first checkpoint. Every row is ``stages.suppress.suppress_images`` with the row's
``--set`` overrides on top of the checkpoint's config and the common ``--set`` items, then
``evaluation.score_folder`` (what metrics.py runs) on its outputs, once per ``--metrics`` mode (faithful: the published metrics at
1024²; corrected: at native resolution unless ``--no-native``). Rows with the same effective
settings share one run; finished outputs are reused, so an interrupted ablation resumes
(``--overwrite`` redoes them). ``--limit N`` scores the first N images of the split only.

Outputs in ``--out``: ``ablation.md`` (every table), ``tables/<table>.md`` and ``.csv``, ``results.json``,
``commands.sh`` (the equivalent ldm_eval.py / metrics.py command lines of every run) and
``figures/offset_tat_histograms.png``; in ``--work`` (default ``<out>/runs``), one folder
``<model>/<settings>-<hash>/`` per run with the predictions (``pred/``) and the metric reports
(``metrics/``), and the ``--limit`` lists.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.datasets import BS, CXR, MASK, split_list, split_location
from data.io import ImageError, read_image
from data.splits import list_paths, read_list
from utils.atomic import atomic_write_text, json_text
from utils.cli import entry_point
from utils.checkpoint import load_checkpoint
from utils.logging import pyplot, save_figure
from evaluation import LABELS, MODES, fit_from_folders, lpips_scorer, score_folder, write_tone_predictions
from stages.suppress import eval_config, suppress_images

TABLES = ("offset_tat", "guidance", "fusion", "sampler")
TITLES = {"offset_tat": "Offset noise and temporal adaptive thresholding (BS-LDM)",
          "guidance": "Guidance of the local path (GL-LCM)",
          "fusion": "Global-local fusion (GL-LCM)",
          "sampler": "Sampler and number of steps"}
# (config value, row label as in the paper tables)
GUIDANCE = (("none", "Vanilla guidance"), ("noise", "CFG (noise reference)"),
            ("global_pred", "LEG (global ε)"), ("global_cond", "LEG (global condition)"))
FUSION = (("none", "✗ (global path)"), ("alpha", "α-fusion"), ("poisson", "Poisson fusion"))
DEFAULT_SAMPLERS = ("lcm", "ddim")
DEFAULT_STEPS = (1, 2, 4, 8)


@dataclass
class Row:
    """One table row: the model, the row's own ``--set`` overrides and its leading table cells."""
    table: str
    model: str
    ckpt: str
    overrides: tuple[str, ...]
    cells: dict[str, str]                     # leading columns, e.g. {"Guidance": "LEG (global ε)"}
    run: "Run | None" = None


@dataclass
class Run:
    """One real ldm_eval.py + metrics.py run, shared by the rows with the same effective settings."""
    key: str
    model: str
    ckpt: str
    sets: tuple[str, ...]                     # every --set item given to ldm_eval.py
    cfg: object
    folder: Path
    list_file: Path
    root: Path
    split: str
    result: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------

def parse_ckpts(items: list[str]) -> dict[str, str]:
    """``["label=path", "path", ...]`` -> {label: path}; an unlabelled path is named after its run folder."""
    out: dict[str, str] = {}
    for item in items:
        label, sep, path = item.partition("=")
        if not sep or not label or "/" in label or not path:
            path, label = item, Path(item).resolve().parent.parent.name or Path(item).stem
        if label in out:
            raise ValueError(f"--ckpt: two checkpoints are labelled '{label}'; name them with --ckpt LABEL=PATH")
        out[label] = path
    if not out:
        raise ValueError("give at least one --ckpt")
    return out


def _offset_cell(ckpt: str) -> str:
    c = load_checkpoint(ckpt, kind="ldm", lazy=True)["config"].get("diffusion", {}).get("offset_noise", 0.1)
    return f"✓ (c = {c:g})" if c else "✗"


def plan_rows(ckpts: dict[str, str], tables=TABLES, samplers=DEFAULT_SAMPLERS, steps=DEFAULT_STEPS) -> list[Row]:
    """The rows of the requested tables (offset_tat for every checkpoint, the others for the first)."""
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; choose from {list(TABLES)}")
    main_label, main_ckpt = next(iter(ckpts.items()))
    rows: list[Row] = []
    for table in tables:
        if table == "offset_tat":
            for label, ckpt in ckpts.items():
                offset = _offset_cell(ckpt)
                for clip in (True, False):
                    rows.append(Row(table, label, ckpt, (f"sampler.clip={str(clip).lower()}",),
                                    {"Model": label, "Offset noise": offset, "TAT": "✓" if clip else "✗"}))
        elif table == "guidance":
            rows += [Row(table, main_label, main_ckpt, ("global_local.enabled=true", f"global_local.leg_mode={mode}"),
                         {"Guidance": label, "leg_mode": mode}) for mode, label in GUIDANCE]
        elif table == "fusion":
            rows += [Row(table, main_label, main_ckpt, ("global_local.enabled=true", f"global_local.fusion={mode}"),
                         {"Fusion": label, "fusion": mode}) for mode, label in FUSION]
        else:
            for name in samplers:
                for n in steps:
                    if name == "lcm" and n > 50:
                        raise ValueError(f"--steps {n}: the LCM sampler has at most 50 steps (its grid)")
                    rows.append(Row(table, main_label, main_ckpt, (f"sampler.name={name}", f"sampler.steps={n}"),
                                    {"Sampler": name, "Steps": str(n)}))
    return rows


def _effective(cfg) -> dict:
    """The settings that change an output: sampler, global-local (only when enabled) and output mode."""
    gl = dataclasses.asdict(cfg.global_local)
    sampler = dataclasses.asdict(cfg.sampler)
    if not gl["enabled"]:
        gl = {"enabled": False}
        sampler.pop("clip_r0_local")
    if sampler["name"] != "ddim":
        sampler.pop("eta")
    return {"sampler": sampler, "global_local": gl, "output": dataclasses.asdict(cfg.output),
            "data": {"root": str(Path(cfg.data.root).resolve()), "max_pixels": cfg.data.max_pixels}}


def _slug(cfg) -> str:
    s, gl = cfg.sampler, cfg.global_local
    path = f"gl-{gl.leg_mode}-{gl.fusion}" if gl.enabled else "global"
    return f"{s.name}{s.steps}-{'tat' if s.clip else 'notat'}-{path}"


def resolve_runs(rows: list[Row], work: Path, split: str, common: tuple[str, ...], limit: int | None,
                 masks_dir: str | None) -> list[Run]:
    """Build every row's config through ``stages.suppress.eval_config`` (so config errors come before any
    work), write the ``--limit`` lists, and attach one :class:`Run` per distinct setting.

    Runs go to ``work/<model>/<settings>-<hash>/``, the ``--limit`` lists to ``work/lists/<model>/``.
    """
    runs: dict[str, Run] = {}
    lists: dict[str, tuple[tuple[str, ...], Path]] = {}
    for row in rows:
        if row.model not in lists:
            base = eval_config(row.ckpt, common)
            list_dir, prefix = split_location(base.data)
            names = split_list(base.data, split)
            extra: tuple[str, ...] = ()
            list_file = list_paths(list_dir, prefix)[split]
            if limit is not None:
                if limit < 1:
                    raise ValueError(f"--limit must be >= 1, got {limit}")
                sub_dir = work / "lists" / row.model
                list_file = list_paths(sub_dir, prefix)[split]
                atomic_write_text(list_file, "".join(f"{n}\n" for n in names[:limit]))
                extra = (f"data.split.list_dir={sub_dir.resolve()}", f"data.split.prefix={prefix}")
            lists[row.model] = (extra, list_file)
        extra, list_file = lists[row.model]
        sets = (*common, *extra, *row.overrides)
        cfg = eval_config(row.ckpt, sets)
        if cfg.global_local.enabled and cfg.global_local.masks != "auto" and masks_dir is None \
                and not (Path(cfg.data.root) / MASK).is_dir():
            raise FileNotFoundError(f"{Path(cfg.data.root) / MASK}: the {row.table} rows need lung masks; give "
                                    "--masks DIR or --set global_local.masks=auto")
        digest = hashlib.sha1(json.dumps({"ckpt": str(Path(row.ckpt).resolve()), "list": str(list_file.resolve()),
                                          **_effective(cfg)}, sort_keys=True).encode()).hexdigest()[:8]
        if digest not in runs:
            runs[digest] = Run(digest, row.model, row.ckpt, sets, cfg, work / row.model / f"{_slug(cfg)}-{digest}",
                               list_file, Path(cfg.data.root), split)
        row.run = runs[digest]
    return list(runs.values())


def metrics_argv(run: Run, mode: str, native: bool, lung: bool) -> list[str]:
    """metrics.py arguments of one run and mode (reports into ``<run>/metrics``)."""
    argv = ["--cxr", str(run.root / CXR), "--gt", str(run.root / BS), "--pred", str(run.folder / "pred"),
            "--list", str(run.list_file), "--mode", mode, "--out", str(run.folder / "metrics")]
    if mode == "corrected":
        argv += (["--native"] if native else []) + (["--mask", str(run.root / MASK)] if lung else [])
    return argv


def commands(runs: list[Run], modes, native: bool, lung: bool, batch_size: int, masks_dir: str | None) -> str:
    """The shell commands equivalent to the runs (what ``commands.sh`` holds)."""
    lines = ["#!/bin/sh", "# Equivalent command lines of every ablation run (written by python -m tools.ablation).", "set -e"]
    for r in runs:
        ev = ["python", "ldm_eval.py", "--ckpt", r.ckpt, "--split", r.split, "--out", str(r.folder / "pred"),
              "--batch-size", str(batch_size), *(["--masks", masks_dir] if masks_dir else []),
              *[a for s in r.sets for a in ("--set", s)]]
        lines.append(shlex.join(ev))
        lines += [shlex.join(["python", "metrics.py", *metrics_argv(r, m, native, lung)]) for m in modes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------------

def score_run(run: Run, pred: Path, mode: str, native: bool, lung: bool, lpips: tuple,
              log: bool = True) -> tuple[int, dict]:
    """Score one prediction folder in one mode (``evaluation.score_folder``, what ``metrics.py`` runs)
    into ``<run>/metrics``, with ``metrics_<tag>.log`` holding what ``metrics.py`` would print when
    ``log``; returns (status, summary): status 0 when every listed image was scored, else 1
    (``metrics.py``'s exit status). ``lpips``: (scorer, reason) of ``evaluation.lpips_scorer``."""
    corrected = mode == "corrected"
    report = score_folder(run.root / CXR, run.root / BS, pred, read_list(run.list_file), mode,
                          run.root / MASK if corrected and lung else None, corrected and native, *lpips,
                          list_file=run.list_file, progress=False)
    report.write(run.folder / "metrics")
    if log:
        atomic_write_text(run.folder / "metrics" / f"metrics_{report.tag}.log", report.transcript(run.folder / "metrics"))
    return int(bool(report.failures)), report.summary


def execute(run: Run, modes, native: bool, lung: bool, batch_size: int, overwrite: bool,
            masks_dir: str | None, progress: bool, lpips: tuple) -> dict:
    """``suppress_images`` (ldm_eval.py), then :func:`score_run` per mode; returns the run record (also ``<run>/run.json``):
    {"sets", "folder", "eval_failures", "seconds_per_image", "eval_seconds", "metrics": {mode: report},
    "status": {mode: 0 all scored / 1 some failed}}. ``lpips``: see :func:`score_run`."""
    t0 = time.perf_counter()
    summary = suppress_images(run.cfg, run.ckpt, split=run.split, out_dir=run.folder / "pred", batch_size=batch_size,
                            overwrite=overwrite, masks_dir=masks_dir, progress=progress)
    # A resumed run writes nothing and reports 0 s per image; ldm_eval.py then keeps the timing.json of
    # the run that wrote the images, so that file holds the timing either way.
    timing = run.folder / "pred" / "timing.json"
    per_image = seconds_per_image(timing)
    result = {"sets": list(run.sets), "folder": str(run.folder), "eval_failures": summary["failures"],
              "seconds_per_image": per_image, "eval_seconds": time.perf_counter() - t0, "metrics": {}, "status": {}}
    for mode in modes:
        result["status"][mode], result["metrics"][mode] = score_run(run, run.folder / "pred", mode, native, lung, lpips)
    atomic_write_text(run.folder / "run.json", json_text(result, indent=2) + "\n")
    return result


def score_baselines(run0: Run, train_names: list[str], work: Path, modes, native: bool, lung: bool,
                    lpips: tuple) -> list[Run]:
    """The two rows every table ends with, scored on the same images as the model's rows:
    the tone curve (one global lookup table CXR -> soft tissue fitted on the train split, see
    ``evaluation.tone_curve``) and the identity (prediction = CXR). A row that does not beat the
    tone curve, above all on the high-pass BSR, has not removed bones."""
    names = read_list(run0.list_file)
    curve = fit_from_folders(run0.root / CXR, run0.root / BS, train_names)
    tone = write_tone_predictions(curve, run0.root / CXR, names, work / "baselines" / "tone-curve" / "pred")
    runs = []
    for key, pred in (("tone-curve", tone), ("identity", run0.root / CXR)):
        run = Run(key, key, "", (), run0.cfg, work / "baselines" / key, run0.list_file, run0.root, run0.split,
                  {"metrics": {}, "status": {}})
        for mode in modes:
            status, summary = score_run(run, pred, mode, native, lung, lpips, log=False)
            run.result["status"][mode], run.result["metrics"][mode] = status, summary
        runs.append(run)
    return runs


def baseline_rows(table_rows: list[Row], baselines: list[Run]) -> list[Row]:
    """Rows for the baselines with the table's leading columns: the label first, '–' elsewhere."""
    lead = list(table_rows[0].cells)
    labels = {"tone-curve": "tone curve (baseline)", "identity": "identity (CXR, baseline)"}
    return [Row(table_rows[0].table, b.model, "", (), {k: (labels[b.key] if i == 0 else "–") for i, k in enumerate(lead)},
                b) for b in baselines]


# --------------------------------------------------------------------------------------------------
# Tables and figures
# --------------------------------------------------------------------------------------------------

def _cell(stat: dict | None, scale: float) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean'] * scale:.3f} ± {stat['std'] * scale:.3f}"


def table_markdown(rows: list[Row], mode: str) -> str:
    """One table in the papers' format: leading cells, then mean ± std per metric, the best in bold."""
    reports = [r.run.result["metrics"].get(mode) if r.run else None for r in rows]
    columns = [c for c in LABELS if any(rep and c in rep["metrics"] for rep in reports)]
    lead = list(rows[0].cells)
    timing = rows[0].table == "sampler"
    header = lead + [LABELS[c][0] for c in columns] + ["n"] + (["s / image"] if timing else [])
    best = {}
    for c in columns:
        label, _ = LABELS[c]
        vals = [rep["metrics"][c]["mean"] if rep and c in rep["metrics"] else None for rep in reports]
        ok = [v for v in vals if v is not None]
        if len(ok) > 1 and ("↑" in label or "↓" in label):
            best[c] = max(ok) if "↑" in label else min(ok)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row, rep in zip(rows, reports):
        cells = [row.cells[k] for k in lead]
        for c in columns:
            stat = rep["metrics"].get(c) if rep else None
            text = _cell(stat, LABELS[c][1])
            cells.append(f"**{text}**" if stat and c in best and stat["mean"] == best[c] else text)
        cells.append(str(rep["n_scored"]) if rep else "0")
        if timing:
            t = row.run.result.get("seconds_per_image") if row.run else None
            cells.append(f"{sum(t.values()):.3f}" if t else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seconds_per_image(timing: Path) -> dict[str, float] | None:
    """The per-stage seconds per image of an evaluation's ``timing.json``; None when it is missing or
    damaged (only the timing column then says n/a: the scores do not depend on it)."""
    try:
        t = json.loads(timing.read_text(encoding="utf-8")).get("seconds_per_image")
    except (OSError, ValueError, RecursionError, AttributeError):
        return None
    ok = isinstance(t, dict) and t and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) for v in t.values())
    return {str(k): float(v) for k, v in t.items()} if ok else None


def table_csv(rows: list[Row], modes) -> str:
    """Long format: one line per row, mode and metric."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["table", "row", "model", "checkpoint", "overrides", "mode", "metric", "mean", "std", "n", "run"])
    for row in rows:
        label = " / ".join(row.cells.values())
        for mode in modes:
            rep = row.run.result["metrics"].get(mode) if row.run else None
            for metric, s in (rep or {}).get("metrics", {}).items():
                w.writerow([row.table, label, row.model, row.ckpt, " ".join(row.overrides), mode, metric,
                            "" if s["mean"] is None else f"{s['mean']:.10g}",
                            "" if s["std"] is None else f"{s['std']:.10g}", s["n"], row.run.folder.name])
    return buf.getvalue()


def histogram_overlap(a: np.ndarray, b: np.ndarray, bins: np.ndarray) -> float:
    """Intersection of two normalised intensity histograms: 1 = identical distributions, 0 = disjoint."""
    ha, _ = np.histogram(a, bins)
    hb, _ = np.histogram(b, bins)
    return float(np.minimum(ha / max(ha.sum(), 1), hb / max(hb.sum(), 1)).sum())


def plot_histograms(rows: list[Row], path: Path, bins: int = 64) -> dict[str, float]:
    """Intensity histograms of prediction vs target, one panel per row (the BS-LDM ablation figure).

    Returns {row label: histogram overlap}.
    """
    plt = pyplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.2), squeeze=False, sharey=True)
    overlaps = {}
    for ax, row in zip(axes[0], rows):
        run = row.run
        names = read_list(run.list_file)
        target = np.concatenate([read_image(run.root / BS / n).pixels.ravel() for n in names])
        preds = [run.folder / "pred" / n for n in names]
        pred = np.concatenate([read_image(p).pixels.ravel() for p in preds if p.is_file()] or [np.zeros(0)])
        label = " / ".join(row.cells.values())
        overlaps[label] = histogram_overlap(pred, target, edges) if pred.size else float("nan")
        ax.hist(target, edges, density=True, color="0.6", alpha=0.6, label="target (soft tissue)")
        ax.hist(pred, edges, density=True, histtype="step", lw=1.8, color="C3", label="prediction")
        (k0, v0), *rest = row.cells.items()
        ax.set_title(f"{k0}: {v0}\n" + ", ".join(f"{k} {v}" for k, v in rest)
                     + f"\nhistogram overlap {overlaps[label]:.3f}", fontsize=9)
        ax.set_xlabel("intensity [0, 1]")
    axes[0, 0].set_ylabel("density")
    axes[0, 0].legend(fontsize=8)
    save_figure(fig, path, dpi=110, bbox_inches="tight")
    return overlaps


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def main(ckpts: list[str] | dict[str, str], out_dir: str | Path, split: str = "test", tables=TABLES,
         samplers=DEFAULT_SAMPLERS, steps=DEFAULT_STEPS, modes=MODES, native: bool = True, lung: bool = False,
         limit: int | None = None, overrides: tuple[str, ...] = (), batch_size: int = 4, overwrite: bool = False,
         masks_dir: str | None = None, dry_run: bool = False, progress: bool = False,
         work_dir: str | Path | None = None) -> dict:
    """Plan, run and tabulate; returns {"tables": {table: markdown}, "runs": ..., "failures": [...]}.

    Args:
        ckpts: ``["label=path", ...]`` or {label: path}; the first is the model of the inference-time tables.
        modes: metrics.py modes, each giving one version of every table.
        native: score corrected mode at native resolution (``metrics.py --native``).
        lung: add the lung-mask scores (corrected mode, ``metrics.py --mask <root>/Mask``).
        limit: score the first ``limit`` images of the split only.
        overrides: ``--set`` items applied to every run before the row's own.
        dry_run: write ``commands.sh`` and print the plan; run nothing.
        work_dir: where the runs' predictions and metric reports go (default ``<out>/runs``); put
            it outside ``out`` to keep a documentation folder small.
    """
    ckpts = dict(ckpts) if isinstance(ckpts, dict) else parse_ckpts(list(ckpts))
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown metrics mode {m!r}; choose from {MODES}")
    out = Path(out_dir)
    work = Path(work_dir) if work_dir else out / "runs"
    rows = plan_rows(ckpts, tuple(tables), tuple(samplers), tuple(steps))
    runs = resolve_runs(rows, work, split, tuple(overrides), limit, masks_dir)
    atomic_write_text(out / "commands.sh", commands(runs, modes, native, lung, batch_size, masks_dir))
    print(f"{len(rows)} rows in {len(dict.fromkeys(r.table for r in rows))} table(s) -> {len(runs)} distinct runs")
    if dry_run:
        for row in rows:
            print(f"  {row.table:<10} {' / '.join(row.cells.values()):<40} -> {row.run.folder}")
        print(f"commands: {out / 'commands.sh'}")
        return {"tables": {}, "runs": {r.key: str(r.folder) for r in runs}, "failures": []}
    failures = []
    lpips = lpips_scorer()   # built once for every run and baseline
    for i, run in enumerate(runs, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(runs)}] {run.model}: {run.folder.name}", flush=True)
        try:
            run.result = execute(run, modes, native, lung, batch_size, overwrite, masks_dir, progress, lpips)
        except (ImageError, ValueError, FileNotFoundError) as e:   # one bad run does not lose the others
            run.result = {"metrics": {}, "error": str(e)}
            print(f"ablation.py: {run.folder.name}: {e}", file=sys.stderr)
        bad = [m for m, s in run.result.get("status", {}).items() if s != 0]
        if "error" in run.result or run.result.get("eval_failures") or bad:
            failures.append({"run": str(run.folder), "error": run.result.get("error"),
                             "eval_failures": run.result.get("eval_failures"), "metrics_status": run.result.get("status")})
        print(f"    {time.perf_counter() - t0:.1f} s", flush=True)

    docs, by_table = {}, {}
    for row in rows:
        by_table.setdefault(row.table, []).append(row)
    train_names = split_list(eval_config(runs[0].ckpt, overrides).data, "train")
    baselines = score_baselines(runs[0], train_names, work, modes, native, lung, lpips)
    extras = {}
    for table, trs in by_table.items():
        reports = trs[0].run.result["metrics"]
        with_baselines = trs + baseline_rows(trs, baselines)
        parts = [f"## {TITLES[table]}", ""]
        models = sorted({r.model for r in trs})
        parts.append(f"Model(s): {', '.join(f'`{m}` ({ckpts[m]})' for m in models)}; {split} split"
                     + (f", first {limit} images" if limit else "") + ". Overrides of every row: "
                     + (", ".join(f"`{o}`" for o in overrides) or "none") + ".")
        for mode in modes:
            size = (reports.get(mode) or {}).get("size", "")
            parts += ["", f"**{mode} metrics{', ' + size if size else ''}** (mean ± population std)", "",
                      table_markdown(with_baselines, mode)]
        if table == "offset_tat":
            try:
                extras["histogram_overlap"] = plot_histograms(trs, out / "figures" / "offset_tat_histograms.png")
                parts += ["", "![intensity histograms](figures/offset_tat_histograms.png)", "",
                          "Histogram overlap (intersection of the normalised intensity histograms of prediction "
                          "and target, 1 = identical): "
                          + ", ".join(f"{k}: {v:.3f}" for k, v in extras["histogram_overlap"].items()) + "."]
            except (ImageError, ValueError) as e:
                print(f"ablation.py: histograms not drawn: {e}", file=sys.stderr)
        docs[table] = "\n".join(parts) + "\n"
        # tables/ is one level down: its copy links the figure from there
        atomic_write_text(out / "tables" / f"{table}.md", docs[table].replace("](figures/", "](../figures/"))
        atomic_write_text(out / "tables" / f"{table}.csv", table_csv(with_baselines, modes))
    atomic_write_text(out / "ablation.md", "# Ablations\n\n" + "\n".join(docs.values()))
    results = {"checkpoints": ckpts, "split": split, "limit": limit, "overrides": list(overrides), "modes": list(modes),
               "rows": [{"table": r.table, "cells": r.cells, "model": r.model, "overrides": list(r.overrides),
                         "run": str(r.run.folder)} for r in rows],
               "runs": {str(r.folder): r.result for r in runs}, "failures": failures, **extras}
    atomic_write_text(out / "results.json", json_text(results, indent=2, ensure_ascii=False, default=str) + "\n")
    print("\n".join(docs.values()))
    print(f"wrote {out / 'ablation.md'}, {out / 'tables'}, {out / 'results.json'}")
    if failures:
        print(f"ablation.py: {len(failures)} run(s) had failures (see results.json)", file=sys.stderr)
    return {"tables": docs, "runs": {r.key: str(r.folder) for r in runs}, "failures": failures}


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", required=True, metavar="[LABEL=]PATH",
                   help="stage-2 checkpoint; repeat (LABEL=PATH) to compare models, e.g. with and without offset noise")
    p.add_argument("--out", dest="out_dir", required=True, help="output folder (tables, figures, results)")
    p.add_argument("--work", dest="work_dir", help="folder for the runs' predictions and reports (default <out>/runs)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    p.add_argument("--samplers", nargs="+", default=list(DEFAULT_SAMPLERS), choices=["ddpm", "ddim", "lcm"])
    p.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS))
    p.add_argument("--metrics", dest="modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--no-native", dest="native", action="store_false",
                   help="score corrected mode at 1024² instead of native resolution")
    p.add_argument("--lung", action="store_true", help="add lung-mask scores (corrected mode, <root>/Mask)")
    p.add_argument("--limit", type=int, help="score only the first N images of the split")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every run, e.g. --set data.root=/data/SZCH-X-Rays")
    p.add_argument("--masks", dest="masks_dir", help="lung-mask folder for the global-local rows (default <root>/Mask)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--overwrite", action="store_true", help="redo runs whose outputs exist")
    p.add_argument("--dry-run", action="store_true", help="print the plan and write commands.sh only")
    p.add_argument("--progress", action="store_true", help="show the sampling progress bars")
    return p


@entry_point()
def cli(argv: list[str] | None = None) -> int:
    """The command line: 0 done, 1 some row failed, 2 bad inputs (one line on stderr)."""
    args = build_parser().parse_args(argv)
    result = main(args.ckpt, args.out_dir, args.split, args.tables, args.samplers, args.steps, args.modes,
                  args.native, args.lung, args.limit, tuple(args.overrides), args.batch_size, args.overwrite,
                  args.masks_dir, args.dry_run, args.progress, args.work_dir)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(cli())

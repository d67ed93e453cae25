"""Cross-domain evaluation: a trained model on another paired dataset, against the tone curve of its own
training data (issue 23, item 4: the DRR-trained student on the real SZCH pairs, the phantom-trained
student on the DRR test views).

Usage:
    python -m tools.cross_domain --ckpt runs/demo/ldm/001-distill/checkpoints/best.pt \
        --train-data datasets/demo --test-data /data/SZCH --masks auto --out runs/cross/drr-on-szch
    python -m tools.cross_domain --ckpt runs/demo-phantom/ldm/001-distill/checkpoints/best.pt \
        --train-data datasets/demo-phantom --test-data datasets/demo --test-list datasets/demo/demo_testset.txt \
        --oracle-tone --out runs/cross/phantom-on-drr
    python -m tools.cross_domain --ckpt CKPT --train-data A --test-data B --out DIR --set sampler.steps=8

Inputs:
    --ckpt        a trained stage-2 (LDM) checkpoint, e.g. the distilled student.
    --train-data  the dataset the model was trained on: CXR/, BS/ and its train list
                  ``<name>_trainset.txt`` (``<name>`` = the checkpoint's ``data.split.prefix`` or
                  ``data.name``), or ``--train-list FILE``. Used only to fit the tone curve (one global
                  lookup table CXR -> soft tissue, ``evaluation.tone_curve``) on the model's own training
                  pairs: the fair baseline, fitted on the same information the model had.
    --test-data   another paired dataset: CXR/, BS/, optional Mask/; ``--test-list FILE`` names the
                  cases (default: every CXR/<name> with a BS/<name>; unpaired CXRs are named on stderr).

Steps: lung masks (``--masks folder``: <test>/Mask, the default when it exists; ``--masks auto``: the
built-in segmenter ``data.lungseg.segment_lungs``, the one ``global_local.masks=auto`` runs, written
to OUT/masks first so that inference and scoring use the same masks; the tool passes its mask
folder to ldm_eval, so a ``--set global_local.masks=...`` is overridden); then ldm_eval.py's library
entry (``stages.suppress.eval_config`` + ``suppress_images``) on the test cases with the checkpoint's config,
``data.root`` pointed at the test data and the ``--set`` items, into OUT/pred. A case without a mask
(no Mask/ file, or lungs the segmenter cannot find: ldm_eval itself would fail such a case, its
``load_mask`` raises) runs through the global path alone (``global_local.enabled=false``) and is
listed in the JSON and on stderr. Then the tone-curve predictions (OUT/tone_curve), with
``--oracle-tone`` a tone curve fitted on the test domain itself, leave-one-out (each case's curve
is fitted on the other test pairs, never on itself; needs at least 2 pairs), an upper reference for
any lookup table (OUT/oracle_tone), and ``evaluation.score_folder`` (what metrics.py runs) in
corrected mode at native size for the model, the tone curve, the oracle tone curve and the identity
(prediction = CXR), with the lung scores where there are masks (reports in OUT/metrics/<column>/;
when only some cases have masks, the lung scores are over those cases, in OUT/metrics/<column>/lungs/).

Outputs: OUT/cross_domain.md (the table: high-pass BSR at W/32 and W/64, the W/32 one in the
lungs, PSNR, SSIM, MSE, mean ± population std, and n), OUT/cross_domain.json (the figures, the
inputs, the masks and the failures) and OUT/cross_domain.png (CXR | target | model | tone curve |
|target − model| for up to ``--figure-cases`` cases). Exit status 0, 1 when a case failed (inference
or scoring; the others are in the table), 2 for bad inputs (one line naming the file).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from data.datasets import BS, CXR, MASK
from data.io import ImageError, list_images, output_name, read_image, write_png
from data.lungseg import segment_lungs
from data.splits import list_paths, read_list
from evaluation import apply_tone_curve, fit_from_folders, score_folder, write_tone_predictions
from evaluation.tone_curve import LEVELS
from models.checkpoints import checkpoint_config
from stages.suppress import eval_config, first_stage, suppress_images
from utils.atomic import atomic_write_text, json_text
from utils.cli import entry_point
from utils.logging import pyplot, save_figure

PROG = "cross_domain"
PREFIX = "cross"                       # the split-list prefix of the test lists this tool writes
# Table rows: (metric key, label, display scale, decimals).
ROWS = (("bsr_hp32", "BSR, high-pass σ = W/32 (%) ↑", 100.0, 1), ("bsr_hp64", "BSR, high-pass σ = W/64 (%) ↑", 100.0, 1),
        ("bsr_hp32_lung", "BSR, high-pass σ = W/32, lungs (%) ↑", 100.0, 1), ("psnr", "PSNR (dB) ↑", 1.0, 2),
        ("ssim", "SSIM ↑", 1.0, 3), ("mse", "MSE (10⁻³) ↓", 1000.0, 3))
COLUMNS = {"model": "model", "tone": "tone curve (train domain)", "oracle_tone": "oracle tone curve (test domain, "
           "leave-one-out)", "identity": "identity (CXR)"}
NO_LPIPS = "not computed by tools.cross_domain (its table has no LPIPS row)"


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def require_pairs_folder(root: Path, flag: str) -> None:
    """``root`` holds CXR/ and BS/, else FileNotFoundError naming the missing folder."""
    for sub in (CXR, BS):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub}: folder not found ({flag} needs {CXR}/ and {BS}/)")


def check_names(root: Path, names: list[str], source: str) -> None:
    """Every named case has CXR/<name> and BS/<name>, else FileNotFoundError naming the first missing file."""
    if not names:
        raise ValueError(f"{source}: no cases")
    missing = [str(root / d / n) for n in names for d in (CXR, BS) if not (root / d / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: not found (named by {source}; {len(missing)} file(s) missing)")


def find_test_cases(root: Path, test_list: str | Path | None) -> list[str]:
    """The test cases: the list's names, or every CXR/<name> with a BS/<name> (the others named on stderr)."""
    if test_list is not None:
        if not Path(test_list).is_file():
            raise FileNotFoundError(f"{test_list}: test list not found")
        names = read_list(test_list)
        check_names(root, names, str(test_list))
        return names
    names, unpaired = [], []
    for p in list_images(root / CXR):
        (names if (root / BS / p.name).is_file() else unpaired).append(p.name)
    for n in unpaired:
        print(f"{PROG}: {root / CXR / n}: no {root / BS / n}; not a test pair", file=sys.stderr)
    if not names:
        raise FileNotFoundError(f"{root / CXR}: no image with a target of the same name in {root / BS}")
    return names


def train_cases(ckpt_cfg, root: Path, train_list: str | Path | None) -> tuple[Path, list[str]]:
    """(list file, names) of the model's training pairs: ``train_list`` or ``<root>/<prefix>_trainset.txt``."""
    path = Path(train_list) if train_list is not None else \
        list_paths(root, ckpt_cfg.data.split.prefix or ckpt_cfg.data.name)["train"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: train list not found (give --train-list FILE)")
    names = read_list(path)
    check_names(root, names, str(path))
    return path, names


# --------------------------------------------------------------------------------------------------
# Masks, inference, baselines
# --------------------------------------------------------------------------------------------------

def lung_masks(root: Path, names: list[str], mode: str, out: Path) -> tuple[Path, list[str], dict[str, str]]:
    """(mask folder, cases with a mask, {case without one: why}).

    ``folder``: <root>/Mask as it is. ``auto``: ``segment_lungs`` of each CXR written to ``out`` as
    0/255 PNGs (``<stem>.png``, what ``data.masking.load_mask`` and the scoring look for)."""
    if mode == "folder":
        mask_dir = root / MASK
        ok, missing = [], {}
        for n in names:
            if (mask_dir / n).is_file() or (mask_dir / (Path(n).stem + ".png")).is_file():
                ok.append(n)
            else:
                missing[n] = f"{mask_dir / n}: lung mask not found"
        return mask_dir, ok, missing
    ok, failed = [], {}
    for n in names:
        try:
            mask = segment_lungs(read_image(root / CXR / n).pixels)
        except (ImageError, ValueError) as e:        # LungSegmentationError: no two lungs found
            failed[n] = f"{root / CXR / n}: lungs not segmented: {e}"
            continue
        write_png(out / (Path(n).stem + ".png"), mask.astype(np.float32), bit_depth=8)
        ok.append(n)
    return out, ok, failed


def eval_settings(ckpt: str | Path, root: Path, list_dir: Path, overrides: tuple[str, ...], global_only: bool):
    """ldm_eval's config for the test cases listed in ``list_dir/<PREFIX>_testset.txt``: the checkpoint's
    config, the test data, the ``--set`` items, then the masks this tool passes (``global_local.masks=folder``)."""
    sets = [*overrides, f"data.root={root.resolve()}", f"data.split.list_dir={list_dir.resolve()}",
            f"data.split.prefix={PREFIX}", "global_local.masks=folder"]
    if global_only:
        sets.append("global_local.enabled=false")
    return eval_config(ckpt, sets), sets


def run_model(ckpt: str | Path, root: Path, names: list[str], masked: list[str], mask_dir: Path,
              overrides: tuple[str, ...], out: Path, batch_size: int, progress: bool) -> tuple[Path, list[dict]]:
    """``suppress_images`` (ldm_eval.py) on the test cases into ``out/pred``: the cases with a mask as the config says
    (global-local by default), the others with the global path alone. Returns (folder, one record per run)."""
    pred = out / "pred"
    for n in names:     # an earlier run's output must not stand in for a case that fails this time
        old = pred / output_name(root / CXR / n)
        if old.is_file() and not old.is_symlink():
            old.unlink()
    cfg, _ = eval_settings(ckpt, root, out / "lists" / "all", overrides, False)
    with_mask = set(masked)
    groups = {"as configured": [n for n in names if n in with_mask or not cfg.global_local.enabled],
              "global path (no lung mask)": [n for n in names if n not in with_mask and cfg.global_local.enabled]}
    runs = []
    for (what, group), sub in zip(groups.items(), ("with_mask", "global_only")):
        if not group:
            continue
        list_dir = out / "lists" / sub
        atomic_write_text(list_paths(list_dir, PREFIX)["test"], "".join(f"{n}\n" for n in group))
        cfg, sets = eval_settings(ckpt, root, list_dir, overrides, sub == "global_only")
        t0 = time.perf_counter()
        summary = suppress_images(cfg, ckpt, split="test", out_dir=pred, batch_size=batch_size, overwrite=True,
                                masks_dir=str(mask_dir), progress=progress)
        runs.append({"cases": what, "n": len(group), "sets": sets, "seconds": time.perf_counter() - t0,
                     **{k: summary[k] for k in ("written", "failures", "sampler", "global_local", "output_mode",
                                                "inference", "seconds_per_image")}})
    return pred, runs


def leave_one_out_curves(cxr_dir: Path, soft_dir: Path, names: list[str]) -> dict[str, np.ndarray]:
    """{case: tone curve fitted on every other pair} (``fit_tone_curve`` of the others, from per-pair
    histograms computed once). Raises ValueError with fewer than 2 pairs."""
    if len(names) < 2:
        raise ValueError("the leave-one-out tone curve needs at least 2 test pairs")
    hists = []
    for n in names:
        cxr, soft = read_image(cxr_dir / n).pixels, read_image(soft_dir / n).pixels
        if cxr.shape != soft.shape:
            raise ValueError(f"{soft_dir / n}: size {soft.shape} differs from its CXR's {cxr.shape}")
        level = np.clip(np.round(np.asarray(cxr, np.float64) * (LEVELS - 1)), 0, LEVELS - 1).astype(np.intp).ravel()
        hists.append((np.bincount(level, weights=np.asarray(soft, np.float64).ravel(), minlength=LEVELS),
                      np.bincount(level, minlength=LEVELS).astype(np.float64)))
    curves = {}
    levels = np.arange(LEVELS, dtype=np.float64)
    for i, n in enumerate(names):
        total, count = np.zeros(LEVELS), np.zeros(LEVELS)
        for j, (t, c) in enumerate(hists):
            if j != i:
                total += t
                count += c
        seen = count > 0
        curves[n] = np.interp(levels, levels[seen], total[seen] / count[seen])
    return curves


def write_oracle_predictions(cxr_dir: Path, soft_dir: Path, names: list[str], out: Path) -> Path:
    """Each case through its leave-one-out curve (same name rules and bit depth as
    ``write_tone_predictions``); the curves go to ``out/tone_curves.json`` ({case: 256 values})."""
    curves = leave_one_out_curves(cxr_dir, soft_dir, names)
    for n in names:
        image = read_image(cxr_dir / n)
        write_png(out / (Path(n).stem + ".png"), apply_tone_curve(curves[n], image.pixels),
                  bit_depth=16 if image.bit_depth > 8 else 8, inputs=(cxr_dir / n,))
    atomic_write_text(out / "tone_curves.json", json_text({n: c.tolist() for n, c in curves.items()}) + "\n")
    return out


# --------------------------------------------------------------------------------------------------
# Scores, table, figure
# --------------------------------------------------------------------------------------------------

def score_column(label: str, pred: Path, root: Path, names: list[str], mask_dir: Path | None, masked: list[str],
                 list_file: Path, out: Path) -> dict:
    """Corrected, native scores of one prediction folder (reports in ``out/<label>/``); the lung scores
    over the cases with a mask (all of them: one report; some: a second report in ``lungs/``)."""
    def problem(name, why):
        print(f"{PROG}: {label}: {name}: {why}", file=sys.stderr)

    every = mask_dir is not None and len(masked) == len(names)
    report = score_folder(root / CXR, root / BS, pred, names, "corrected", mask_dir if every else None, True, None,
                          NO_LPIPS, list_file=list_file, on_problem=problem, progress=False)
    report.write(out / label)
    metrics, failures = dict(report.metrics), list(report.failures)
    if mask_dir is not None and masked and not every:
        lung = score_folder(root / CXR, root / BS, pred, masked, "corrected", mask_dir, True, None, NO_LPIPS,
                            on_problem=problem, progress=False)
        lung.write(out / label / "lungs")
        metrics.update({k: v for k, v in lung.metrics.items() if k.endswith("_lung")})
        failures += [f for f in lung.failures if f["name"] not in {g["name"] for g in failures}]
    return {"pred": str(pred), "n_listed": report.summary["n_listed"], "n_scored": report.summary["n_scored"],
            "metrics": metrics, "failures": failures}


def _cell(stat: dict | None, scale: float, decimals: int, n_scored: int) -> str:
    """``mean ± std`` of one metric, with its n when it differs from the column's (the lung scores)."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    text = f"{stat['mean'] * scale:.{decimals}f} ± {stat['std'] * scale:.{decimals}f}"
    return text + (f" (n = {stat['n']})" if stat["n"] != n_scored else "")


def table_markdown(columns: dict[str, dict]) -> str:
    """The cross-domain table: one row per metric of :data:`ROWS`, one column per scored folder, then n."""
    labels = list(columns)
    lines = ["| corrected, native | " + " | ".join(COLUMNS[c] for c in labels) + " |",
             "|---" * (len(labels) + 1) + "|"]
    for key, label, scale, decimals in ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(columns[c]["metrics"].get(key), scale, decimals,
                                                         columns[c]["n_scored"])
                                                   for c in labels) + " |")
    lines.append("| n (images scored) | " + " | ".join(str(columns[c]["n_scored"]) for c in labels) + " |")
    return "\n".join(lines)


def save_cases_figure(root: Path, names: list[str], pred: Path, tone: Path, path: Path, n_cases: int = 4) -> list[str]:
    """CXR | target | model | tone curve | |target − model| for the first ``n_cases`` cases whose files all
    exist; the error is shown from 0 (black) to the 99.5th percentile of |target − CXR| (the bone
    image's scale: a model that did nothing looks like the bone image). Returns the cases drawn."""
    def find(folder: Path, n: str) -> Path | None:
        return next((p for p in (folder / n, folder / (Path(n).stem + ".png")) if p.is_file()), None)

    cases = []
    for n in names:
        files = [root / CXR / n, root / BS / n, find(pred, n), find(tone, n)]
        if all(f is not None and f.is_file() for f in files):
            cases.append((n, [read_image(f).pixels for f in files]))
        if len(cases) == n_cases:
            break
    if not cases:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(len(cases), 5, figsize=(13, 2.8 * len(cases)), squeeze=False)
    titles = ("CXR", "target (soft tissue)", "model", "tone curve (train domain)", "|target − model|")
    for row, (n, (cxr, gt, model, tone_img)) in zip(axes, cases):
        scale = max(float(np.percentile(np.abs(gt - cxr), 99.5)), 1e-3)
        for ax, img, title in zip(row, (cxr, gt, model, tone_img, np.abs(gt - model)), titles):
            if title.startswith("|"):
                ax.imshow(img, cmap="magma", vmin=0.0, vmax=scale)
                title = f"{title}\n(white = {scale:.3f}, p99.5 of |target − CXR|)"
            else:
                ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(n, fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    return [n for n, _ in cases]


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def main(ckpt: str | Path, train_data: str | Path, test_data: str | Path, out_dir: str | Path,
         test_list: str | Path | None = None, train_list: str | Path | None = None, masks: str | None = None,
         overrides: tuple[str, ...] = (), oracle_tone: bool = False, batch_size: int = 4, figure_cases: int = 4,
         progress: bool = False) -> dict:
    """Run, score and tabulate; returns what OUT/cross_domain.json holds (plus "table": the markdown).

    Args:
        masks: "folder" (<test>/Mask), "auto" (the built-in segmenter), None: folder when <test>/Mask
            exists, else auto.
        overrides: ``--set`` items for the evaluation (sampler, guidance, output ...).
        oracle_tone: add the leave-one-out tone curve fitted on the test pairs.
    Raises:
        FileNotFoundError, ValueError, CheckpointError, ConfigError: bad inputs, before any work.
    """
    ckpt, train_root, test_root, out = Path(ckpt), Path(train_data), Path(test_data), Path(out_dir)
    if masks not in (None, "auto", "folder"):
        raise ValueError(f"masks must be 'auto' or 'folder', got {masks!r}")
    if batch_size < 1 or figure_cases < 0:
        raise ValueError("batch_size must be >= 1 and figure_cases >= 0")
    # every check before any work: the checkpoint (an LDM, its first stage), both datasets, the lists
    trained = checkpoint_config(ckpt, "ldm")
    require_pairs_folder(train_root, "--train-data")
    require_pairs_folder(test_root, "--test-data")
    train_file, train_names = train_cases(trained, train_root, train_list)
    names = find_test_cases(test_root, test_list)
    if oracle_tone and len(names) < 2:
        raise ValueError(f"--oracle-tone: the leave-one-out tone curve needs at least 2 test pairs, "
                         f"{test_list or test_root} has {len(names)}")
    mode = masks or ("folder" if (test_root / MASK).is_dir() else "auto")
    if mode == "folder" and not (test_root / MASK).is_dir():
        raise FileNotFoundError(f"{test_root / MASK}: folder not found (--masks folder); use --masks auto")
    cfg, _ = eval_settings(ckpt, test_root, out / "lists" / "all", tuple(overrides), False)   # ConfigError now
    first_stage(ckpt, cfg, trained)                                                 # CheckpointError now
    list_file = list_paths(out / "lists" / "all", PREFIX)["test"]
    atomic_write_text(list_file, "".join(f"{n}\n" for n in names))

    mask_dir, masked, unmasked = lung_masks(test_root, names, mode, out / "masks")
    for why in unmasked.values():
        print(f"{PROG}: {why}; the model runs the global path for it and its lung scores are left out", file=sys.stderr)
    pred, runs = run_model(ckpt, test_root, names, masked, mask_dir, tuple(overrides), out, batch_size, progress)
    curve = fit_from_folders(train_root / CXR, train_root / BS, train_names)
    preds = {"model": pred, "tone": write_tone_predictions(curve, test_root / CXR, names, out / "tone_curve")}
    if oracle_tone:
        preds["oracle_tone"] = write_oracle_predictions(test_root / CXR, test_root / BS, names, out / "oracle_tone")
    preds["identity"] = test_root / CXR
    columns = {label: score_column(label, folder, test_root, names, mask_dir if masked else None, masked, list_file,
                                   out / "metrics") for label, folder in preds.items()}
    table = table_markdown(columns)
    drawn = save_cases_figure(test_root, names, pred, preds["tone"], out / "cross_domain.png", figure_cases) \
        if figure_cases else []
    failures = [{"stage": "inference", **f} for r in runs for f in r["failures"]] + \
               [{"stage": f"score {label}", **f} for label, c in columns.items() for f in c["failures"]]
    result = {"checkpoint": str(ckpt), "train_data": str(train_root), "train_list": str(train_file),
              "n_train": len(train_names), "test_data": str(test_root), "test_list": str(test_list or list_file),
              "n_test": len(names), "masks": {"mode": mode, "folder": str(mask_dir), "n_with_mask": len(masked),
                                              "without_mask": unmasked},
              "overrides": list(overrides), "inference": runs, "mode": "corrected", "size": "native",
              "columns": {label: {"title": COLUMNS[label], **c} for label, c in columns.items()},
              "rows": [{"metric": k, "label": lab, "scale": s} for k, lab, s, _ in ROWS],
              "figure": {"path": str(out / "cross_domain.png") if drawn else None, "cases": drawn},
              "failures": failures}
    notes = [f"Model: `{ckpt}`; trained on `{train_root}` ({len(train_names)} train pairs, `{train_file.name}`). "
             f"Test: `{test_root}`, {len(names)} pairs. Corrected metrics at native size (`evaluation.score_folder`), "
             "mean ± population std.",
             "The tone curve is fitted on the model's training pairs only (the same information as the model)"
             + ("; the oracle tone curve on the test pairs, leave-one-out (no case is fitted on itself): an upper "
                "reference for any global lookup table." if oracle_tone else "."),
             f"Lung masks: {mode} (`{mask_dir}`), {len(masked)} of {len(names)} cases"
             + (f"; without one (global path, no lung scores): {', '.join(unmasked)}." if unmasked else ".")
             + (f" Evaluation overrides: {', '.join(f'`{o}`' for o in overrides)}." if overrides else "")]
    if failures:
        notes.append(f"{len(failures)} failure(s): see cross_domain.json.")
    doc = "# Cross-domain evaluation\n\n" + table + "\n\n" + "\n\n".join(notes) + "\n" \
        + ("\n![cases](cross_domain.png)\n" if drawn else "")
    atomic_write_text(out / "cross_domain.md", doc)
    atomic_write_text(out / "cross_domain.json", json_text(result, indent=2, ensure_ascii=False) + "\n")
    print(table)
    print(f"\nwrote {out / 'cross_domain.md'}, {out / 'cross_domain.json'}"
          + (f", {out / 'cross_domain.png'}" if drawn else ""))
    if failures:
        print(f"{PROG}: {len(failures)} failure(s) (see cross_domain.json)", file=sys.stderr)
    return {**result, "table": table}


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="python -m tools.cross_domain", description=head, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="trained stage-2 (LDM) checkpoint, e.g. the distilled student")
    p.add_argument("--train-data", required=True, metavar="ROOT",
                   help="the model's training dataset (CXR/, BS/, <name>_trainset.txt): fits the tone curve")
    p.add_argument("--train-list", metavar="FILE", help="the training pairs (default <train-data>/<name>_trainset.txt)")
    p.add_argument("--test-data", required=True, metavar="ROOT", help="the other paired dataset (CXR/, BS/, optional Mask/)")
    p.add_argument("--test-list", metavar="FILE", help="test cases, one per line (default: every pair)")
    p.add_argument("--out", dest="out_dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--masks", choices=["auto", "folder"],
                   help="lung masks: <test-data>/Mask (folder, the default when it exists) or the built-in segmenter (auto)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="evaluation override, e.g. --set sampler.steps=8")
    p.add_argument("--oracle-tone", action="store_true",
                   help="add a tone curve fitted on the test pairs, leave-one-out (an upper reference)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--figure-cases", type=int, default=4, help="cases in cross_domain.png (0: no figure)")
    p.add_argument("--progress", action="store_true", help="show the sampling progress bars")
    return p


@entry_point()
def cli(argv: list[str] | None = None) -> int:
    """The command line: 0 done, 1 some case failed, 2 bad inputs (one line on stderr)."""
    args = build_parser().parse_args(argv)
    result = main(args.ckpt, args.train_data, args.test_data, args.out_dir, args.test_list, args.train_list,
                  args.masks, tuple(args.overrides), args.oracle_tone, args.batch_size, args.figure_cases,
                  args.progress)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(cli())

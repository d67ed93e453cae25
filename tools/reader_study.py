"""Clinical-evaluation kit (the BS-LDM reader study, docs/method.md §6.3): blinded export and aggregation.

Usage:
    # 1. export a blinded, randomised set of image pairs with a scoring sheet per reader
    python -m tools.reader_study export --source cxr=datasets/demo/CXR \
        --source soft_tissue=runs/demo/ldm/001-distill/eval/test --list datasets/demo/demo_testset.txt \
        --readers junior senior --seed 0 --out study/
    # 2. the readers fill study/sheets/<reader>.csv; then unblind and tabulate
    python -m tools.reader_study aggregate --key study.key.json --sheets study/sheets/*.csv \
        --reference datasets/demo/nodules.csv --out study_results/

``export`` takes two image folders (``--source LABEL=DIR``, twice: the original and the soft tissue,
or two methods) and the cases of ``--list`` (default: every image of the first folder; ``--n`` draws
a random subset). The case order, the anonymous case IDs (C001, C002 ...) and the left/right
placement of the two images (balanced: half of the cases each way) are drawn from ``--seed``. The
reader package ``--out`` holds ``images/<case>_L.png`` and ``_R.png`` (re-encoded, so no file
metadata or name survives; 16-bit sources stay 16-bit), ``viewer.html`` (the pairs side by side),
``instructions.txt`` and the scoring sheet(s): ``sheets/<reader>.csv`` per ``--readers`` name, or one
``sheet.csv`` with an empty reader column. The key (case ID -> image name and which source is on
which side) goes to ``--key``, by default ``<out>.key.json`` *beside* the package, so that the
package can be handed out as it is.

Sheet columns (one row per case and side; each image is scored on its own):
``case_id, side, reader, vessel_visibility, airway_visibility, bone_suppression, lesion_present,
lesion_location, notes``. Scores are integers 1–3 (3 best; blank = not scored); lesion_present is
yes/no (also y/n, 1/0, true/false; blank = not answered); location and notes are free text.

``aggregate`` reads the returned sheets (extra columns are ignored; comma, semicolon or tab
separated; UTF-8 with or without BOM) and the key, unblinds every row, and writes into ``--out``:

* ``quality.md`` / ``.csv``: per source, the mean score of each criterion per reader and the mean
  over readers (mean of the reader means), as in docs/method.md §6.3;
* with ``--reference``: ``detection.md`` / ``.csv``, image-level precision / recall / F1 of
  ``lesion_present`` per reader and source (and their mean over readers). The reference is a CSV
  keyed by image name (or case ID) with a yes/no ``lesion`` column, or a list of lesions such as the
  phantom generator's ``nodules.csv`` (``name,row,col,radius``): an image has a lesion if it has a row;
* ``unblinded.csv`` (every sheet row with its image name and source) and ``summary.json``.

An invalid sheet stops with one error naming the file, the row (spreadsheet numbering: the header
is row 1) and the column: a missing column, an unknown case ID or side, an empty reader, a score
outside 1–3, an unreadable yes/no, or the same reader scoring the same image twice.
"""
from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import re
import sys
from pathlib import Path

import numpy as np

from data.io import is_image_file, list_images, read_image, write_png
from data.splits import read_list
from utils.atomic import atomic_write_text, json_text
from utils.cli import entry_point

KEY_FORMAT = "reader-study-key/1"
SIDES = ("L", "R")
CRITERIA = {"vessel_visibility": "Lung-vessel visibility",
            "airway_visibility": "Airway visibility",
            "bone_suppression": "Degree of bone suppression"}
COLUMNS = ("case_id", "side", "reader", *CRITERIA, "lesion_present", "lesion_location", "notes")
YES, NO = {"yes", "y", "1", "true", "ja", "oui"}, {"no", "n", "0", "false", "nein", "non"}
MAX_SCORE = 3

INSTRUCTIONS = """Reader study: instructions

Each case shows two images of the same patient side by side, L (left) and R (right), in
viewer.html or in images/<case>_L.png and images/<case>_R.png. Which image is which is hidden
and changes from case to case. Score each image on its own row of your sheet (case_id, side):

  vessel_visibility   lung vessels:  1 = poorly visible, 2 = visible, 3 = clearly visible to the periphery
  airway_visibility   trachea and main bronchi:  1 = poorly visible, 2 = visible, 3 = clearly visible
  bone_suppression    ribs and clavicles:  1 = clearly visible (not suppressed), 2 = partly suppressed,
                      3 = fully suppressed
  lesion_present      yes / no: is there a lung lesion (nodule, mass, consolidation) in this image?
  lesion_location     free text, e.g. "right upper zone" (only when lesion_present is yes)
  notes               free text

Scores are whole numbers 1, 2 or 3; leave a cell empty if you cannot score it. Keep the case_id,
side and reader columns as they are, and return the sheet as CSV.
"""


class SheetError(ValueError):
    """A returned sheet (or reference) cannot be used; the message names the file, row and column."""


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

def parse_source(item: str) -> tuple[str, Path]:
    """``"label=DIR"`` -> (label, DIR)."""
    label, sep, folder = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or not folder:
        raise ValueError(f"--source {item}: expected LABEL=DIR with a label of letters, digits, '_', '-' or '.'")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--source {item}: {folder} is not a folder")
    return label, Path(folder)


def find_image(folder: Path, name: str) -> Path | None:
    """``folder/name``, or the image of ``folder`` with the same stem (predictions are written as PNG)."""
    p = folder / name
    if p.is_file():
        return p
    stem = Path(name).stem
    return next((q for q in sorted(folder.glob(f"{glob_escape(stem)}.*")) if is_image_file(q)), None)


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "reader"


def sheet_text(case_ids: list[str], reader: str = "") -> str:
    """An empty scoring sheet: one row per case and side."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for cid in case_ids:
        for side in SIDES:
            w.writerow([cid, side, reader] + [""] * (len(COLUMNS) - 3))
    return buf.getvalue()


def viewer_html(case_ids: list[str], title: str) -> str:
    """A self-contained page showing each pair side by side (images referenced relatively)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;background:#111;color:#ddd;margin:1em}"
             "section{margin:2em 0;border-top:1px solid #444}.pair{display:flex;gap:1%}"
             "figure{margin:0;width:49.5%}img{width:100%;image-rendering:auto;background:#000}"
             "figcaption{text-align:center;font-size:1.4em;font-weight:bold}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><pre>{html.escape(INSTRUCTIONS)}</pre>"]
    for cid in case_ids:
        parts.append(f"<section id='{cid}'><h2>{cid}</h2><div class='pair'>" + "".join(
            f"<figure><figcaption>{s}</figcaption><img alt='{cid} {s}' src='images/{cid}_{s}.png'></figure>"
            for s in SIDES) + "</div></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def export(sources: list[str], out_dir: str | Path, key_path: str | Path | None = None,
           list_file: str | Path | None = None, n: int | None = None, seed: int = 0,
           readers: tuple[str, ...] = (), force: bool = False) -> dict:
    """Write the blinded reader package and the key; return the key.

    Raises:
        ValueError / FileNotFoundError: bad sources, a case missing from a source, a key inside the
            package, or an existing package without ``force``.
    """
    if len(sources) != 2:
        raise ValueError(f"give exactly two --source LABEL=DIR, got {len(sources)}")
    (la, da), (lb, db) = (parse_source(s) for s in sources)
    if la == lb:
        raise ValueError(f"the two sources have the same label '{la}'")
    out = Path(out_dir)
    key_path = Path(key_path) if key_path else out.parent / f"{out.name}.key.json"
    if key_path.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--key {key_path} lies inside the reader package {out}: the readers would see it")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use --force to overwrite)")
        # An earlier export's images and sheets would otherwise linger beside the new case IDs.
        for old in [*out.glob("images/C*_[LR].png"), *out.glob("sheets/*.csv"), out / "sheet.csv"]:
            old.unlink(missing_ok=True)
    names = read_list(list_file) if list_file else [p.name for p in list_images(da)]
    if not names:
        raise ValueError("no cases: the list (or the first source folder) is empty")
    paths = {}
    for name in names:
        pa, pb = find_image(da, name), find_image(db, name)
        missing = [str(d / name) for d, p in ((da, pa), (db, pb)) if p is None]
        if missing:
            raise FileNotFoundError(f"case '{name}': image not found: {', '.join(missing)}")
        paths[name] = (pa, pb)
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    if n is not None:
        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        order = order[:n]
    # Balanced placement: exactly half of the cases (rounded down) show source b on the left.
    swap = rng.permutation(np.arange(len(order)) < len(order) // 2)
    width = max(3, len(str(len(order))))
    cases = []
    for i, (name, swapped) in enumerate(zip(order, swap)):
        cid = f"C{i + 1:0{width}d}"
        (left, lp), (right, rp) = ((lb, paths[name][1]), (la, paths[name][0])) if swapped else \
            ((la, paths[name][0]), (lb, paths[name][1]))
        for side, src in (("L", lp), ("R", rp)):
            im = read_image(src)
            # Re-encoded from pixels: no PNG text chunks or DICOM tags (names, dates) reach the readers.
            write_png(out / "images" / f"{cid}_{side}.png", im.pixels, bit_depth=16 if im.bit_depth > 8 else 8)
        cases.append({"case_id": cid, "name": name, "L": left, "R": right})
    ids = [c["case_id"] for c in cases]
    if readers:
        for r in readers:
            atomic_write_text(out / "sheets" / f"{_safe(r)}.csv", sheet_text(ids, r))
    else:
        atomic_write_text(out / "sheet.csv", sheet_text(ids))
    atomic_write_text(out / "instructions.txt", INSTRUCTIONS)
    atomic_write_text(out / "viewer.html", viewer_html(ids, "Bone suppression reader study"))
    key = {"format": KEY_FORMAT, "seed": seed, "labels": [la, lb], "sources": {la: str(da), lb: str(db)},
           "list": str(list_file) if list_file else None, "readers": list(readers), "cases": cases}
    atomic_write_text(key_path, json_text(key, indent=2) + "\n")
    print(f"{len(cases)} cases ({la} vs {lb}, seed {seed}) -> {out}; key (keep it from the readers): {key_path}")
    return key


# --------------------------------------------------------------------------------------------------
# Reading sheets
# --------------------------------------------------------------------------------------------------

def read_key(path: str | Path) -> dict:
    p = Path(path)
    try:
        key = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: key file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a reader-study key ({e})") from None
    except RecursionError:
        raise ValueError(f"{p}: not a reader-study key (nested too deeply)") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise ValueError(f"{p}: not a reader-study key (no '{KEY_FORMAT}' format field)")
    _check_key(p, key)
    return key


def _check_key(p: Path, key: dict) -> None:
    """The fields aggregation reads, with their types: a damaged or edited key is one error naming the
    field, not a KeyError or TypeError deep in the tables."""
    labels, cases = key.get("labels"), key.get("cases")
    if not (isinstance(labels, list) and len(labels) == 2 and all(isinstance(x, str) for x in labels)):
        raise ValueError(f"{p}: damaged key: 'labels' must be two condition names")
    if not isinstance(cases, list):
        raise ValueError(f"{p}: damaged key: 'cases' must be a list")
    for i, c in enumerate(cases):
        if not (isinstance(c, dict) and all(isinstance(c.get(f), str) for f in ("case_id", "name", "L", "R"))):
            raise ValueError(f"{p}: damaged key: cases[{i}] needs the strings case_id, name, L and R")


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, data rows) of a CSV with a sniffed delimiter (',', ';' or tab) and an optional BOM."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SheetError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise SheetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the sheet as CSV (UTF-8)") from None
    first = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=first.count)
    try:
        rows = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    except csv.Error as e:        # a field beyond csv's size limit, a NUL byte
        raise SheetError(f"{path}: not a readable CSV sheet ({e})") from None
    if not rows or not any(c.strip() for c in rows[0]):
        raise SheetError(f"{path}: row 1: empty file, expected a header row")
    return [c.strip().lower() for c in rows[0]], rows[1:]


def parse_yes_no(value: str) -> bool | None:
    """yes/no -> True/False; blank -> None. Raises ValueError otherwise."""
    v = value.strip().lower()
    if not v:
        return None
    if v in YES:
        return True
    if v in NO:
        return False
    raise ValueError(f"'{value}' is not yes or no")


def parse_score(value: str) -> int | None:
    """'1' / '2' / '3' (also '2.0', as spreadsheets write it) -> int; blank -> None. Raises ValueError."""
    v = value.strip()
    if not v:
        return None
    try:
        f = float(v.replace(",", "."))
    except ValueError:
        raise ValueError(f"'{value}' is not a score (a whole number 1 to {MAX_SCORE})") from None
    if not f.is_integer() or not 1 <= f <= MAX_SCORE:
        raise ValueError(f"score '{value}' is outside 1–{MAX_SCORE} (whole numbers only)")
    return int(f)


def read_sheet(path: str | Path, key: dict, seen: dict | None = None) -> list[dict]:
    """Validated, unblinded rows of one returned sheet.

    Each row: {reader, case_id, side, name, label, <criteria>: int | None, lesion: bool | None,
    lesion_location, notes, file, row}. Fully empty rows are skipped.

    Args:
        seen: {(reader, case_id, side): "file row N"} shared across sheets to catch double scoring.
    Raises:
        SheetError: naming the file, the row (header = row 1) and the column.
    """
    p = Path(path)
    header, rows = _read_csv(p)
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise SheetError(f"{p}: row 1: missing column(s) {', '.join(repr(c) for c in missing)} "
                         f"(the sheet needs: {', '.join(COLUMNS)})")
    col = {c: header.index(c) for c in COLUMNS}
    cases = {c["case_id"]: c for c in key["cases"]}
    seen = {} if seen is None else seen
    out = []
    for i, raw in enumerate(rows, start=2):
        if not any(c.strip() for c in raw):
            continue
        cells = {c: (raw[j] if j < len(raw) else "") for c, j in col.items()}

        def fail(column: str, why: str) -> SheetError:
            return SheetError(f"{p}: row {i}, column '{column}': {why}")

        cid = cells["case_id"].strip()
        if cid not in cases:
            raise fail("case_id", f"unknown case ID '{cid}' (not in the key)" if cid else "empty case ID")
        side = cells["side"].strip().upper()
        if side not in SIDES:
            raise fail("side", f"'{cells['side']}' is not L or R")
        reader = cells["reader"].strip()
        if not reader:
            raise fail("reader", "empty reader name")
        entry = {"reader": reader, "case_id": cid, "side": side, "name": cases[cid]["name"],
                 "label": cases[cid][side], "file": str(p), "row": i}
        for c in CRITERIA:
            try:
                entry[c] = parse_score(cells[c])
            except ValueError as e:
                raise fail(c, str(e)) from None
        try:
            entry["lesion"] = parse_yes_no(cells["lesion_present"])
        except ValueError as e:
            raise fail("lesion_present", str(e)) from None
        entry["lesion_location"] = cells["lesion_location"].strip()
        entry["notes"] = cells["notes"].strip()
        k = (reader, cid, side)
        if k in seen:
            raise fail("case_id", f"reader '{reader}' scored {cid} {side} twice (also {seen[k]})")
        seen[k] = f"{p} row {i}"
        out.append(entry)
    return out


def read_reference(path: str | Path, key: dict) -> dict[str, bool]:
    """Lesion yes/no per image name of the key, from a reference CSV.

    Two formats: a ``lesion`` (or ``lesion_present``) column with yes/no per ``name`` (or
    ``case_id``), where every case of the key must be listed; or a list of lesions such as
    ``nodules.csv`` (``name,row,col,radius``): an image has a lesion if it has at least one row.
    Names match exactly or by stem.
    """
    p = Path(path)
    header, rows = _read_csv(p)
    id_col = next((c for c in ("name", "image", "case_id", "case") if c in header), None)
    if id_col is None:
        raise SheetError(f"{p}: row 1: no 'name' or 'case_id' column")
    lesion_col = next((c for c in ("lesion", "lesion_present") if c in header), None)
    by_id = {c["case_id"]: c["name"] for c in key["cases"]}
    by_stem = {Path(c["name"]).stem: c["name"] for c in key["cases"]}

    def resolve(ident: str) -> str | None:
        ident = ident.strip()
        return by_id.get(ident) or by_stem.get(Path(ident).stem)

    truth: dict[str, bool] = {}
    for i, raw in enumerate(rows, start=2):
        if not any(c.strip() for c in raw):
            continue
        cells = dict(zip(header, raw))
        name = resolve(cells.get(id_col, ""))
        if name is None:
            continue        # a reference may cover more images than the study (nodules.csv: all phantoms)
        if lesion_col is None:
            truth[name] = True
            continue
        try:
            value = parse_yes_no(cells.get(lesion_col, ""))
        except ValueError as e:
            raise SheetError(f"{p}: row {i}, column '{lesion_col}': {e}") from None
        if value is None:
            raise SheetError(f"{p}: row {i}, column '{lesion_col}': empty; the reference needs yes or no")
        truth[name] = value
    names = [c["name"] for c in key["cases"]]
    if lesion_col is not None:
        missing = [n for n in names if n not in truth]
        if missing:
            raise SheetError(f"{p}: no entry for {len(missing)} case(s) of the study, e.g. '{missing[0]}'")
    return {n: truth.get(n, False) for n in names}


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------

def _mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def quality_stats(entries: list[dict], labels: list[str], readers: list[str]) -> dict:
    """{label: {criterion: {reader: {"mean", "std", "n"}, "Mean": mean of the reader means}}}."""
    out = {}
    for label in labels:
        out[label] = {}
        for c in CRITERIA:
            per = {}
            for r in readers:
                vals = [e[c] for e in entries if e["label"] == label and e["reader"] == r and e[c] is not None]
                per[r] = {"mean": float(np.mean(vals)) if vals else float("nan"),
                          "std": float(np.std(vals)) if vals else float("nan"), "n": len(vals)}
            per["Mean"] = {"mean": _mean(v["mean"] for v in per.values()), "n": sum(v["n"] for v in per.values())}
            out[label][c] = per
    return out


def prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision TP/(TP+FP), recall TP/(TP+FN), F1 2TP/(2TP+FP+FN); NaN where the denominator is 0
    (no "yes" answers, no lesions in the reference, or neither)."""
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    f = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else float("nan")
    return p, r, f


def detection_stats(entries: list[dict], truth: dict[str, bool], labels: list[str], readers: list[str]) -> dict:
    """{label: {reader: {tp, fp, fn, tn, n, precision, recall, f1}, "Mean": {precision, recall, f1}}}."""
    out = {}
    for label in labels:
        out[label] = {}
        for r in readers:
            answers = [(e["lesion"], truth[e["name"]]) for e in entries
                       if e["label"] == label and e["reader"] == r and e["lesion"] is not None]
            tp = sum(a and t for a, t in answers)
            fp = sum(a and not t for a, t in answers)
            fn = sum(t and not a for a, t in answers)
            tn = sum(not a and not t for a, t in answers)
            p, rc, f = prf(tp, fp, fn)
            out[label][r] = {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "n": len(answers),
                             "precision": p, "recall": rc, "f1": f}
        out[label]["Mean"] = {m: _mean(out[label][r][m] for r in readers) for m in ("precision", "recall", "f1")}
    return out


def _f(x: float, digits: int) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def quality_markdown(stats: dict, readers: list[str]) -> str:
    """§6.3 image-quality tables: one per source, criteria × readers + mean (maximum score 3)."""
    parts = []
    for label, crit in stats.items():
        parts += [f"### Image quality: {label} (maximum score {MAX_SCORE})", "",
                  "| Criterion | " + " | ".join(readers) + " | Mean |", "|" + " --- |" * (len(readers) + 2)]
        for c, per in crit.items():
            parts.append(f"| {CRITERIA[c]} | " + " | ".join(_f(per[r]["mean"], 3) for r in readers)
                         + f" | {_f(per['Mean']['mean'], 3)} |")
        parts.append("")
    return "\n".join(parts)


def detection_markdown(stats: dict, readers: list[str], n_cases: int, n_lesion: int) -> str:
    """§6.3 diagnostic-utility table: readers × sources, cells precision / recall / F1."""
    labels = list(stats)
    lines = [f"### Lesion detection ({n_cases} cases, {n_lesion} with a lesion in the reference): "
             "precision / recall / F1", "", "| Reader | " + " | ".join(labels) + " |", "|" + " --- |" * (len(labels) + 1)]
    for r in [*readers, "Mean"]:
        lines.append(f"| {r} | " + " | ".join(
            " / ".join(_f(stats[lb][r][m], 2) for m in ("precision", "recall", "f1")) for lb in labels) + " |")
    return "\n".join(lines) + "\n"


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if isinstance(v, float) and math.isnan(v) else (f"{v:.6g}" if isinstance(v, float) else v)
                    for v in row])
    return buf.getvalue()


def aggregate(key_path: str | Path, sheets: list[str | Path], out_dir: str | Path,
              reference: str | Path | None = None) -> dict:
    """Unblind the sheets and write the quality / detection tables; return the summary."""
    key = read_key(key_path)
    if not sheets:
        raise ValueError("give at least one returned sheet (--sheets)")
    seen: dict = {}
    entries = [e for s in sheets for e in read_sheet(s, key, seen)]
    if not entries:
        raise SheetError(f"{sheets[0]}: no scored rows in the sheet(s)")
    readers = list(dict.fromkeys(e["reader"] for e in entries))
    labels = key["labels"]
    out = Path(out_dir)
    n_images = 2 * len(key["cases"])
    warnings = []
    for r in readers:
        done = {(e["case_id"], e["side"]) for e in entries if e["reader"] == r}
        if len(done) < n_images:
            warnings.append(f"reader '{r}' has rows for {len(done)} of {n_images} images")
        blanks = sum(e[c] is None for e in entries if e["reader"] == r for c in CRITERIA)
        if blanks:
            warnings.append(f"reader '{r}' left {blanks} score(s) blank")
    for w in warnings:
        print(f"reader_study.py: {w}", file=sys.stderr)

    quality = quality_stats(entries, labels, readers)
    docs = [quality_markdown(quality, readers)]
    atomic_write_text(out / "quality.md", docs[0])
    atomic_write_text(out / "quality.csv", _csv(
        ["source", "criterion", "reader", "mean", "std", "n"],
        [[lb, c, r, v["mean"], v.get("std", float("nan")), v["n"]]
         for lb, crit in quality.items() for c, per in crit.items() for r, v in per.items()]))
    summary = {"key": str(key_path), "sheets": [str(s) for s in sheets], "readers": readers, "labels": labels,
               "n_cases": len(key["cases"]), "n_rows": len(entries), "warnings": warnings, "quality": quality}
    if reference is not None:
        truth = read_reference(reference, key)
        detection = detection_stats(entries, truth, labels, readers)
        n_lesion = sum(truth.values())
        docs.append(detection_markdown(detection, readers, len(truth), n_lesion))
        atomic_write_text(out / "detection.md", docs[-1])
        atomic_write_text(out / "detection.csv", _csv(
            ["source", "reader", "tp", "fp", "fn", "tn", "n", "precision", "recall", "f1"],
            [[lb, r, *(v.get(k, "") for k in ("tp", "fp", "fn", "tn", "n")), v["precision"], v["recall"], v["f1"]]
             for lb, per in detection.items() for r, v in per.items()]))
        summary.update({"reference": str(reference), "n_lesion": n_lesion, "detection": detection})
    atomic_write_text(out / "unblinded.csv", _csv(
        ["reader", "case_id", "side", "name", "source", *CRITERIA, "lesion_present", "lesion_location", "notes",
         "file", "row"],
        [[e["reader"], e["case_id"], e["side"], e["name"], e["label"], *(e[c] if e[c] is not None else "" for c in CRITERIA),
          "" if e["lesion"] is None else ("yes" if e["lesion"] else "no"), e["lesion_location"], e["notes"],
          e["file"], e["row"]] for e in entries]))
    # JSON has no NaN: undefined values (no answers, no lesions) are written as null.
    atomic_write_text(out / "summary.json", json_text(summary, indent=2, ensure_ascii=False) + "\n")
    print("\n".join(docs))
    print(f"wrote {out}")
    return summary


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write the blinded reader package and the key")
    e.add_argument("--source", action="append", required=True, metavar="LABEL=DIR",
                   help="image folder of one condition; give it twice (e.g. cxr=... and soft_tissue=...)")
    e.add_argument("--out", required=True, help="reader package folder (what the readers get)")
    e.add_argument("--key", help="key file (default <out>.key.json, beside the package)")
    e.add_argument("--list", dest="list_file", help="case names, one per line (default: every image of the first source)")
    e.add_argument("--n", type=int, help="random subset of this many cases")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--readers", nargs="+", default=[], help="one pre-filled sheet per reader")
    e.add_argument("--force", action="store_true", help="write into a non-empty --out")
    a = sub.add_parser("aggregate", help="unblind returned sheets and write the tables")
    a.add_argument("--key", required=True)
    a.add_argument("--sheets", nargs="+", required=True, help="returned CSV sheets")
    a.add_argument("--reference", help="lesion reference CSV (name,lesion yes/no; or nodules.csv)")
    a.add_argument("--out", required=True, help="folder for the tables")
    return p


@entry_point()
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; 0 on success, 2 on bad input (the message names the file, row and column)."""
    args = build_parser().parse_args(argv)
    if args.command == "export":
        export(args.source, args.out, args.key, args.list_file, args.n, args.seed, tuple(args.readers), args.force)
    else:
        aggregate(args.key, args.sheets, args.out, args.reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())

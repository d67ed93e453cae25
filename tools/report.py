"""A static HTML report of a bone-suppression run that opens from disk with no server.

Usage:
    python -m tools.report --root datasets/demo --pred runs/demo/ldm/001-distill/eval/test \
        --list datasets/demo/demo_testset.txt --out runs/demo/report.html \
        [--metrics LABEL=runs/demo/metrics/model/metrics_corrected_native.json ...] \
        [--benchmark runs/demo/benchmark.json] [--curves LABEL=runs/demo/vqgan/000-demo/curves.png ...]

For every listed test image: CXR | prediction | target | removed bone (CXR − prediction), a
before/after slider (CXR under the prediction), and a crop at native pixels (zoomed 2x with no
smoothing, where the ribs cross the lung) of CXR | prediction | target | removed bone | bone of the
target, the two bone images on one symmetric scale. Then the metrics table of the model beside the
baselines (the tone curve, the identity: prediction = CXR), histograms of prediction and target intensities, the
sampling benchmark table and the training curves. Images are embedded as base64 PNG, so the one
HTML file is the whole report. The page checks itself when opened with ``#selftest``: it moves
every slider and writes the outcome (and any JavaScript error) into ``<body data-selftest=...>``,
which the tests read from a headless browser.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data.io import read_image
from data.splits import read_list
from utils.atomic import atomic_write_text
from utils.cli import entry_point

METRIC_ROWS = [("bsr_sym", "BSR, symmetric (%) ↑", 100.0),
               ("bsr_hp32", "BSR, high-pass σ = W/32 (%) ↑", 100.0), ("bsr_hp64", "BSR, high-pass σ = W/64 (%) ↑", 100.0),
               ("bsr", "BSR, published (%) ↑", 100.0),
               ("mse", "MSE (10⁻³) ↓", 1000.0), ("psnr", "PSNR (dB) ↑", 1.0), ("ssim", "SSIM ↑", 1.0),
               ("lpips", "LPIPS ↓", 1.0)]

CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.case{display:flex;gap:8px;align-items:flex-start;margin:12px 0;flex-wrap:wrap}
figure{margin:0;text-align:center;font-size:.85em}figure img{width:200px;height:auto;image-rendering:auto}
.slider{position:relative;width:300px;user-select:none}.slider img{width:300px;display:block}
.slider .top{position:absolute;top:0;left:0;width:100%;height:100%;clip-path:inset(0 50% 0 0)}
.slider input{width:300px}
.note{color:#555;font-size:.9em}
.missing{color:#a00;font-weight:bold}
.zoom img{width:256px;height:256px;image-rendering:pixelated}
"""

JS = """
function setSlider(input){
  var top=input.parentNode.querySelector('.top');
  top.style.clipPath='inset(0 '+(100-Number(input.value))+'% 0 0)';
}
document.querySelectorAll('.slider input').forEach(function(i){
  i.addEventListener('input',function(){setSlider(i);});setSlider(i);
});
if(location.hash==='#selftest'){
  var ok=true,n=0;
  document.querySelectorAll('.slider input').forEach(function(i){
    var top=i.parentNode.querySelector('.top');
    var before=top.style.clipPath;i.value=20;i.dispatchEvent(new Event('input'));
    if(top.style.clipPath===before||top.style.clipPath.indexOf('80%')<0){ok=false;}n++;
  });
  document.body.setAttribute('data-selftest',(ok&&n>0?'ok':'fail')+' sliders='+n+' errors='+window.__errors.length);
}
"""


class ReportError(ValueError):
    """An input file of the report is unusable; the message names it."""


def text(value) -> str:
    """Any value read from a file, as HTML text: escaped, and cut to 200 characters."""
    s = str(value)
    return html.escape(s if len(s) <= 200 else s[:197] + "...")


def number(value) -> float | None:
    """``value`` if it is a finite number (not a bool), else None: a file's field is never trusted to be one."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def cell(value, fmt: str = ".3f") -> str:
    """A table cell: a number formatted with ``fmt``, anything else as escaped text, missing as a dash."""
    if value is None:
        return "–"
    v = number(value)
    return format(v, fmt) if v is not None else text(value)


def png_data_uri(pixels: np.ndarray) -> str:
    """float [0, 1] (H, W) -> data:image/png;base64,..."""
    arr = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def file_data_uri(path: Path) -> str:
    """A PNG file as a data URI; raises ReportError (naming it) for a missing, unreadable or non-PNG file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ReportError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not data.startswith(PNG_MAGIC):
        raise ReportError(f"{path}: not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode()


def thumbnail(pixels: np.ndarray, side: int = 300) -> np.ndarray:
    """Downscale for the page (the report is for looking, not for scoring)."""
    im = Image.fromarray(np.clip(pixels * 255, 0, 255).astype(np.uint8))
    im.thumbnail((side, side), Image.Resampling.LANCZOS)
    return np.asarray(im, dtype=np.float32) / 255


def histogram_png(pred: list[np.ndarray], target: list[np.ndarray]) -> str:
    """Intensity histograms of predictions and targets (all test images pooled)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    bins = np.linspace(0, 1, 65)
    ax.hist(np.concatenate([t.ravel() for t in target]), bins, alpha=0.5, density=True, label="target (soft tissue)")
    ax.hist(np.concatenate([p.ravel() for p in pred]), bins, alpha=0.5, density=True, label="prediction")
    ax.set_xlabel("intensity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def metrics_table(summaries: dict[str, dict]) -> str:
    """Rows = metrics, columns = runs (e.g. model / identity), cells mean ± std from metrics.py JSON.
    Every field comes from a file: numbers are formatted, anything else is escaped text or a dash."""
    cols = list(summaries)
    out = ["<table><tr><th>metric</th>" + "".join(f"<th>{text(c)}</th>" for c in cols) + "</tr>"]
    for key, label, scale in METRIC_ROWS:
        cells = []
        for c in cols:
            m = _mapping(_mapping(summaries[c]).get("metrics")).get(key)
            mean, std = number(_mapping(m).get("mean")), number(_mapping(m).get("std"))
            cells.append("<td>–</td>" if mean is None else
                         f"<td>{mean * scale:.3f} ± {cell(None if std is None else std * scale)}</td>")
        if any(c != "<td>–</td>" for c in cells):
            out.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
    n = {c: _mapping(summaries[c]).get("n_scored", "?") for c in cols}
    out.append("<tr><td>images scored</td>" + "".join(f"<td>{cell(n[c], 'g')}</td>" for c in cols) + "</tr></table>")
    return "\n".join(out)


def benchmark_table(rows: list[dict]) -> str:
    """The tools.benchmark rows; every field comes from a file, so each is formatted or escaped, never trusted."""
    out = ["<table><tr><th>scenario</th><th>sampler</th><th>steps</th><th>UNet calls</th><th>encode s</th>"
           "<th>sample s</th><th>decode s</th><th>fusion s</th><th>total s</th><th>peak memory</th></tr>"]
    rows = [r for r in rows if isinstance(r, dict)]
    for r in rows:
        s = _mapping(r.get("seconds"))
        steps = cell(r.get("steps"), "g") + (f" (timed {cell(r.get('steps_timed'), 'g')}, extrapolated)"
                                             if r.get("extrapolated") else "")
        name = cell(r.get("scenario")) + (f" ({cell(r['precision'])})" if "precision" in r else "")
        mem = number(r.get("peak_memory_bytes"))
        out.append(f"<tr><td>{name}</td><td>{cell(r.get('sampler'))}</td><td>{steps}</td>"
                   f"<td>{cell(r.get('unet_calls'), 'g')}</td>"
                   + "".join(f"<td>{cell(s.get(k))}</td>" for k in ("encode", "sample", "decode", "fusion", "total"))
                   + f"<td>{'–' if mem is None else f'{mem / 2**20:.0f} MiB'}</td></tr>")
    out.append("</table>")
    if rows:
        out.append(f"<p class='note'>{cell(rows[0].get('device'))}, {cell(rows[0].get('image'), 'g')}² input, "
                   "one image.</p>")
    return "\n".join(out)


def lung_crop(shape: tuple[int, int], mask: np.ndarray | None, side: int = 128) -> tuple[slice, slice]:
    """A (side x side) window at native pixels, centred in the image-left lung (ribs over lung).

    Without a mask: the upper-left part of the chest, where that lung usually is.
    """
    h, w = shape
    side = min(side, h, w)
    if mask is not None and mask[:, : w // 2].any():
        rows, cols = np.nonzero(mask[:, : w // 2])
        r, c = int(np.median(rows)), int(np.median(cols))
    else:
        r, c = int(0.4 * h), int(0.3 * w)
    r0 = min(max(r - side // 2, 0), h - side)
    c0 = min(max(c - side // 2, 0), w - side)
    return slice(r0, r0 + side), slice(c0, c0 + side)


def symmetric_view(x: np.ndarray, scale: float) -> np.ndarray:
    """Signed image -> [0, 1] display: mid-grey is 0, black -scale, white +scale."""
    return np.clip(0.5 + x / (2.0 * scale), 0.0, 1.0)


def zoom_figures(cxr: np.ndarray, pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None) -> str:
    """Native-pixel crops of one case, with the removed bone and the target's bone on one scale."""
    win = lung_crop(cxr.shape, mask)
    removed, target_bone = (cxr - pred)[win], (cxr - gt)[win]
    scale = max(float(np.percentile(np.abs(target_bone), 99.5)), 1e-3)
    tiles = [("CXR", cxr[win]), ("prediction", pred[win]), ("target", gt[win]),
             (f"removed bone (CXR − prediction), ±{scale:.3f}", symmetric_view(removed, scale)),
             (f"bone of the target (CXR − target), ±{scale:.3f}", symmetric_view(target_bone, scale))]
    return "".join(f"<figure class='zoom'><img alt='{html.escape(t)} (native pixels)' src='{png_data_uri(p)}'>"
                   f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, p in tiles)


def build_report(root: Path, pred_dir: Path, names: list[str], metrics: dict[str, dict] | None = None,
                 benchmark: list[dict] | None = None, curves: dict[str, Path] | None = None,
                 title: str = "Bone suppression report", notes: list[str] | None = None) -> str:
    """The HTML text. ``metrics``: {"column name": metrics.py summary JSON}; ``curves``: {label: PNG}."""
    cases, preds, targets, missing = [], [], [], []
    for name in names:
        try:
            case, pred, gt = case_html(root, pred_dir, name)
        except Exception as e:     # this case's failure: a visible placeholder, the other cases still shown
            why = " ".join(str(e).split()) or type(e).__name__
            missing.append(name)
            cases.append(f"<h3>{html.escape(name)}</h3><p class='missing'>not shown: {text(why)}</p>")
            continue
        cases.append(case)
        preds.append(pred)
        targets.append(gt)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             # Page errors, failed resources (capture phase) and console.error calls all land in
             # window.__errors, which the #selftest run writes into the DOM for the headless test.
             "<script>window.__errors=[];window.addEventListener('error',function(e){window.__errors.push("
             "String(e.message||e.target&&e.target.src||'error'));},true);var __ce=console.error;"
             "console.error=function(){window.__errors.push([].join.call(arguments,' '));"
             "__ce.apply(console,arguments);};</script>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for note in notes or []:
        parts.append(f"<p class='note'>{html.escape(note)}</p>")
    if missing:
        parts.append(f"<p class='missing'>{len(missing)} of {len(names)} listed images could not be shown "
                     f"(see Test images): {text(', '.join(missing))}</p>")
    if metrics:
        parts.append("<h2>Metrics on the test split</h2>" + metrics_table(metrics))
        parts.append("<p class='note'>Corrected metrics at native resolution (symmetric BSR: 1 = perfect, "
                     "0 = output equals input). The high-pass BSR scores only structure finer than a "
                     "Gaussian of σ = width/32 or width/64, so a change of tone alone scores 0 there. "
                     "Baselines: the identity (the CXR itself) and the tone curve (one global lookup table "
                     "CXR → soft tissue fitted on the training split): a model that does not beat the tone "
                     "curve has not learned to remove bones.</p>")
    if preds:
        parts.append(f"<h2>Intensity histograms</h2><img alt='histograms' src='{histogram_png(preds, targets)}'>")
    if benchmark:
        parts.append("<h2>Sampling benchmark</h2>" + benchmark_table(benchmark))
    if curves:
        parts.append("<h2>Training curves</h2>" + "".join(curve_figure(k, Path(v)) for k, v in curves.items()))
    parts.append("<h2>Test images</h2>" + "".join(cases))
    parts.append(f"<script>{JS}</script></body></html>")
    return "\n".join(parts)


def case_html(root: Path, pred_dir: Path, name: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(the HTML of one listed image, its prediction, its target); raises if an image cannot be read."""
    cxr = read_image(root / "CXR" / name).pixels
    gt = read_image(root / "BS" / name).pixels
    pred = read_image(pred_dir / name).pixels
    if not cxr.shape == gt.shape == pred.shape:
        raise ValueError(f"sizes differ: CXR {cxr.shape}, target {gt.shape}, prediction {pred.shape}")
    bone = np.clip((cxr - pred) * 2 + 0.5, 0, 1)           # removed bone, mid-grey = nothing removed
    tiles = [("CXR", cxr), ("prediction", pred), ("target (soft tissue)", gt), ("removed bone ×2", bone)]
    figs = "".join(f"<figure><img alt='{html.escape(t)}' src='{png_data_uri(thumbnail(p, 200))}'>"
                   f"<figcaption>{html.escape(t)}</figcaption></figure>" for t, p in tiles)
    slider = (f"<figure><div class='slider'><img alt='CXR' src='{png_data_uri(thumbnail(cxr))}'>"
              f"<img class='top' alt='prediction' src='{png_data_uri(thumbnail(pred))}'>"
              f"<input type='range' min='0' max='100' value='50' aria-label='before/after {html.escape(name)}'>"
              f"</div><figcaption>slide: prediction (left) / CXR (right)</figcaption></figure>")
    mask_path = root / "Mask" / name
    mask = read_image(mask_path).pixels > 0.5 if mask_path.is_file() else None
    if mask is not None and mask.shape != cxr.shape:
        mask = None                                        # a mismatched mask only moves the crop window
    return (f"<h3>{html.escape(name)}</h3><div class='case'>{figs}{slider}</div>"
            f"<p class='note'>At native pixels (2× zoom, no smoothing), inside the lung:</p>"
            f"<div class='case'>{zoom_figures(cxr, pred, gt, mask)}</div>"), pred, gt


def curve_figure(label: str, path: Path) -> str:
    """One training-curve PNG, or a visible placeholder naming the file that could not be embedded."""
    try:
        src = file_data_uri(path)
    except ReportError as e:
        return f"<p class='missing'>{html.escape(label)}: not shown: {text(e)}</p>"
    return (f"<figure><img style='width:560px' alt='{html.escape(label)}' src='{src}'>"
            f"<figcaption>{html.escape(label)}</figcaption></figure>")


def read_json(path: str | Path, what: str):
    """A JSON input of the report; a missing, unreadable or invalid file is a ReportError naming it."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{p}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{p}: {what} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except RecursionError:
        raise ReportError(f"{p}: {what} is nested too deeply") from None
    except ValueError as e:
        raise ReportError(f"{p}: {what} is not JSON ({e})") from None


def main(root: str | Path, pred: str | Path, list_file: str | Path, out: str | Path,
         metrics: dict[str, str | Path] | None = None, benchmark: str | Path | None = None,
         curves: dict[str, str | Path] | None = None, title: str = "Bone suppression report",
         notes: list[str] | None = None) -> Path:
    """Write the report; returns its path. Raises ReportError / OSError (each naming its file) for an
    unusable JSON input or list, or an output that cannot be written; a listed image that cannot be
    read is a placeholder in the report."""
    summaries = {k: read_json(v, "metrics summary") for k, v in (metrics or {}).items()}
    bad = [str(v) for k, v in (metrics or {}).items() if not isinstance(summaries[k], dict)]
    if bad:
        raise ReportError(f"{bad[0]}: not a metrics.py summary (a JSON object)")
    bench = read_json(benchmark, "benchmark") if benchmark else None
    bench = bench.get("rows") if isinstance(bench, dict) else bench     # tools.benchmark --out: {"rows", "flops"}
    if bench is not None and not isinstance(bench, list):
        raise ReportError(f"{benchmark}: not a tools.benchmark output (no list of rows)")
    page = build_report(Path(root), Path(pred), read_list(list_file), summaries, bench,
                        {k: Path(v) for k, v in (curves or {}).items()}, title, notes)
    try:
        atomic_write_text(out, page)
    except OSError as e:     # a full disk: Python's error names no file
        raise OSError(f"{out}: not written ({e.strerror or e})") from None
    return Path(out)


def _pairs(items: list[str], flag: str, parser: argparse.ArgumentParser) -> dict[str, str]:
    bad = [i for i in items if "=" not in i]
    if bad:
        parser.error(f"{flag} {bad[0]}: expected LABEL=FILE")
    return dict(i.split("=", 1) for i in items)


@entry_point(OSError)
def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Write a static HTML report of a bone-suppression run.")
    p.add_argument("--root", required=True, help="dataset folder with CXR/ and BS/")
    p.add_argument("--pred", required=True, help="folder of predictions (same file names)")
    p.add_argument("--list", required=True, help="split list of the images to show")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--metrics", nargs="*", default=[], metavar="LABEL=JSON", help="metrics.py summaries to tabulate")
    p.add_argument("--benchmark", help="tools.benchmark --out JSON")
    p.add_argument("--curves", nargs="*", default=[], metavar="LABEL=PNG", help="training curves to embed")
    a = p.parse_args(argv)
    print(main(a.root, a.pred, a.list, a.out, _pairs(a.metrics, "--metrics", p), a.benchmark,
               _pairs(a.curves, "--curves", p)))


if __name__ == "__main__":
    sys.exit(cli())

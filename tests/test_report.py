"""tools.report: the HTML report's content, and (with Debian's chromium installed) that it loads in a
headless browser with no JavaScript or console errors and that its sliders move."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from evaluation import score_folder
from tools import report
from data.io import read_image, write_png
from tests.scripts import tiny_dataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    root = tiny_dataset(base / "ds")
    pred = base / "pred"
    names = (root / "demo_testset.txt").read_text().split()
    for n in names:   # a stand-in prediction: halfway between the CXR and the target
        write_png(pred / n, 0.5 * (read_image(root / "CXR" / n).pixels + read_image(root / "BS" / n).pixels))
    for label, folder in (("m", pred), ("i", root / "CXR")):
        score_folder(root / "CXR", root / "BS", folder, names, "corrected", native=True, progress=False).write(base / label)
    bench = [{"scenario": "ours", "sampler": "lcm", "steps": 4, "steps_timed": 4, "extrapolated": False,
              "unet_calls": 4, "seconds": {"encode": 0.1, "sample": 0.2, "decode": 0.1, "fusion": 0.05,
                                           "total": 0.45}, "peak_memory_bytes": 2**30, "device": "cpu", "image": 32}]
    (base / "bench.json").write_text(json.dumps(bench))
    out = report.main(root, pred, root / "demo_testset.txt", base / "report.html",
                      metrics={"model": base / "m" / "metrics_corrected_native.json",
                               "identity": base / "i" / "metrics_corrected_native.json"},
                      benchmark=base / "bench.json", title="test report")
    return out, names


def test_report_content(built):
    out, names = built
    text = out.read_text()
    assert text.count("type='range'") == len(names) and text.count("<h3>") == len(names)
    assert "BSR, symmetric (%) ↑" in text and "<th>identity</th>" in text
    assert re.search(r"<td>BSR, symmetric \(%\) ↑</td><td>[\d.]+ ± [\d.]+</td><td>0\.000 ± 0\.000</td>", text)
    assert "Intensity histograms" in text and "Sampling benchmark" in text
    # the high-pass BSR rows, and per case five native-pixel crops with the two bone images on one scale
    assert re.search(r"<td>BSR, high-pass σ = W/32 \(%\) ↑</td><td>[-\d.]+ ± [\d.]+</td><td>0\.000 ± 0\.000</td>", text)
    assert text.count("(native pixels)") == 5 * len(names)
    scales = re.findall(r"removed bone \(CXR − prediction\), ±([\d.]+) \(native pixels\)'.*?"
                        r"bone of the target \(CXR − target\), ±([\d.]+) \(native pixels\)'", text)
    assert len(scales) == len(names) and all(a == b for a, b in scales)
    assert "src='http" not in text and "src=\"http" not in text      # self-contained: nothing to fetch


def test_lung_crop_and_symmetric_view():
    import numpy as np

    mask = np.zeros((200, 300), bool)
    mask[40:140, 30:110] = True                     # the image-left lung
    rows, cols = report.lung_crop(mask.shape, mask, side=64)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (64, 64)
    assert rows.start <= 90 <= rows.stop and cols.start <= 70 <= cols.stop
    rows, cols = report.lung_crop((50, 60), None, side=128)          # larger than the image: clipped
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 50, 0, 50)
    v = report.symmetric_view(np.array([-0.2, 0.0, 0.1, 0.5]), 0.2)
    assert v.tolist() == [0.0, 0.5, 0.75, 1.0]


def test_report_in_headless_chromium(built, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    out, names = built
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{out}#selftest"],
                         capture_output=True, text=True, timeout=120)
    match = re.search(r'data-selftest="([^"]*)"', res.stdout)
    assert match, res.stderr[-2000:]
    assert match.group(1) == f"ok sliders={len(names)} errors=0"

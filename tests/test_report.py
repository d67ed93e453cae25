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
from tests.conftest import tiny_dataset


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


# ---- hostile and broken inputs (issue 24, 2.9) -------------------------------------------------------

@pytest.fixture
def small(tmp_path):
    """A 6-image dataset with predictions (= the CXR) and a list of all six."""
    root = tiny_dataset(tmp_path / "ds", n=6)
    names = sorted(p.name for p in (root / "CXR").iterdir())
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    pred = tmp_path / "pred"
    for n in names:
        write_png(pred / n, read_image(root / "CXR" / n).pixels)
    return root, pred, tmp_path / "list.txt", names


XSS = "<script>document.title='pwned'</script><img src=x onerror=alert(1)>"


def test_fields_of_the_json_inputs_are_escaped(small, tmp_path):
    """A benchmark JSON and a metrics summary with markup in every field: shown as text, never as markup;
    a string where a number belongs is shown as text, not a TypeError."""
    root, pred, list_file, names = small
    # Well-formed numbers, markup in the text fields (the page ran it before).
    row = {"scenario": XSS, "sampler": XSS, "steps": 4, "steps_timed": 4, "extrapolated": False, "unet_calls": 4,
           "seconds": dict.fromkeys(("encode", "sample", "decode", "fusion", "total"), 0.1),
           "peak_memory_bytes": 2**20, "device": "cpu", "image": XSS}
    (tmp_path / "b0.json").write_text(json.dumps([row]))
    (tmp_path / "m0.json").write_text(json.dumps({"n_scored": XSS, "metrics": {"psnr": {"mean": 30.0, "std": 1.0}}}))
    page = report.main(root, pred, list_file, tmp_path / "r0.html", metrics={"m": tmp_path / "m0.json"},
                       benchmark=tmp_path / "b0.json").read_text()
    assert "<script>document" not in page and page.count("<script") == 2 and "<td>30.000 ± 1.000</td>" in page
    # Markup everywhere, strings where numbers belong.
    bench = {"rows": [{"scenario": XSS, "sampler": XSS, "steps": XSS, "steps_timed": XSS, "extrapolated": True,
                       "unet_calls": XSS, "precision": XSS, "seconds": {"encode": XSS, "total": 1.5},
                       "peak_memory_bytes": XSS, "device": XSS, "image": XSS}, "not a row"], "flops": {}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    summary = {"n_scored": XSS, "metrics": {"psnr": {"mean": XSS, "std": 1.0}, "ssim": {"mean": 0.5, "std": XSS},
                                            "mse": XSS}}
    (tmp_path / "m.json").write_text(json.dumps(summary))
    out = report.main(root, pred, list_file, tmp_path / "r.html", metrics={XSS: tmp_path / "m.json"},
                      benchmark=tmp_path / "bench.json", notes=[XSS], title=XSS)
    page = out.read_text()
    assert "<script>document" not in page and "<img src=x" not in page
    assert page.count("<script") == 2                       # the report's own two scripts, nothing else
    assert "&lt;script&gt;document.title=" in page and "<td>1.500</td>" in page
    assert "<td>SSIM ↑</td><td>0.500 ± –</td>" in page            # a std that is no number: a dash


def test_unreadable_listed_images_are_placeholders(small, tmp_path):
    """A missing prediction, a damaged one, a folder at an image's name and a size mismatch: each is a
    visible placeholder naming the problem; the other images are shown."""
    root, pred, list_file, names = small
    (pred / names[0]).unlink()
    (pred / names[1]).write_bytes(b"not an image")
    (root / "BS" / names[2]).unlink()
    (root / "BS" / names[2]).mkdir()
    write_png(pred / names[3], read_image(pred / names[3]).pixels[:10, :10])
    out = report.main(root, pred, list_file, tmp_path / "r.html", curves={"loss": tmp_path / "nope.png"})
    page = out.read_text()
    assert page.count("type='range'") == len(names) - 4
    assert page.count("<p class='missing'>not shown:") == 4 and "sizes differ" in page
    assert f"4 of {len(names)} listed images could not be shown" in page
    assert "loss: not shown:" in page and "nope.png" in page
    # Nothing readable at all: still a report (no histograms), not a traceback.
    for n in names[4:]:
        (pred / n).unlink()
    page = report.main(root, pred, list_file, tmp_path / "r2.html").read_text()
    assert "Intensity histograms" not in page and f"{len(names)} of {len(names)} listed images" in page


def test_bad_json_inputs_and_a_full_disk_are_one_error_line(small, tmp_path, monkeypatch):
    import errno
    import sys

    from tests.conftest import ROOT

    root, pred, list_file, names = small
    (tmp_path / "bad.json").write_text("{not json")
    base = [sys.executable, "-m", "tools.report", "--root", str(root), "--pred", str(pred), "--list", str(list_file),
            "--out", str(tmp_path / "r.html")]
    for extra, needle in ((["--metrics", f"m={tmp_path / 'bad.json'}"], f"{tmp_path / 'bad.json'}: metrics summary is not JSON"),
                          (["--metrics", f"m={tmp_path / 'none.json'}"], "none.json: metrics summary not found"),
                          (["--benchmark", str(tmp_path / "bad.json")], "bad.json: benchmark is not JSON"),
                          (["--metrics", "no-label"], "--metrics no-label: expected LABEL=FILE")):
        res = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and "Traceback" not in res.stderr and needle in lines[-1], res.stderr
        assert not (tmp_path / "r.html").exists()

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "atomic_write_text", full)
    with pytest.raises(OSError, match=f"{tmp_path / 'r.html'}: not written \\(No space left on device\\)"):
        report.main(root, pred, list_file, tmp_path / "r.html")

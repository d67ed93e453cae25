"""metrics.py: hand-computed values for every metric in both modes, the real SZCH pairs, LPIPS
(stub and random-backbone networks, no weights needed), and the CLI's per-file failure reports."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation as M
import metrics
from data.io import read_image
from tests.conftest import write_gray


@pytest.fixture
def no_lpips_weights(tmp_path, monkeypatch):
    """An empty torch hub cache, whatever this machine has."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def random_lpips():
    torch.manual_seed(0)
    return M.LpipsScorer(random_backbone=True, device="cpu", batch_size=2)


# ------------------------------------------------------------------------------ resampling

def test_resize_hand_computed_upsample():
    # 2 -> 4 with half-pixel centres: source coordinates -0.25 (clamped to 0), 0.25, 0.75, 1.25 (-> 1).
    out = M.resize_bilinear(np.array([[0.0, 1.0], [1.0, 3.0]]), (4, 4))
    row = np.array([0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(out[0], row)
    np.testing.assert_allclose(out[:, 0], row)
    np.testing.assert_allclose(out[3], [1.0, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(out[1, 1], 0.75 * 0.75 * 0 + 0.75 * 0.25 * 1 + 0.25 * 0.75 * 1 + 0.25 * 0.25 * 3)


@pytest.mark.parametrize("src,dst", [((5, 7), (13, 11)), ((13, 11), (5, 4)), ((8, 8), (4, 4)), ((9, 6), (9, 6))])
def test_resize_matches_torch_bilinear(src, dst):
    x = np.random.default_rng(0).random(src)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=dst, mode="bilinear",
                                          align_corners=False, antialias=False)[0, 0].numpy()
    np.testing.assert_allclose(M.resize_bilinear(x, dst), ref, atol=1e-12)


def test_quantize_8bit():
    # 8-bit values pass unchanged; 16-bit 32768 -> round(127.502) = 128.
    x = np.array([0.0, 37 / 255, 32768 / 65535, 1.0])
    np.testing.assert_allclose(M.quantize_8bit(x), [0.0, 37 / 255, 128 / 255, 1.0])


# ------------------------------------------------------------------------------ hand-computed metrics

GT = np.array([[0.2, 0.4], [0.6, 0.8]])
BONE = np.array([[0.1, 0.2], [0.0, 0.1]])  # Σ bone² = 0.06


def test_bsr_published_one_sided_and_mean_shift():
    # gt - pred = [[-0.1, 0.1], [0, 0]]: mean 0, only the +0.1 pixel counts -> 1 - 0.01 / 0.06.
    pred = GT + np.array([[0.1, -0.1], [0.0, 0.0]])
    assert M.bsr_published(GT + BONE, GT, pred, size=None) == pytest.approx(1 - 0.01 / 0.06)
    # A constant offset is removed by the mean shift: perfect score.
    assert M.bsr_published(GT + BONE, GT, GT + 0.05, size=None) == pytest.approx(1.0)
    # Too bright everywhere but one pixel: after the shift only that pixel is darker than gt.
    pred = GT + np.array([[0.2, 0.2], [0.2, 0.0]])  # mean(gt - pred) = -0.15
    assert M.bsr_published(GT + BONE, GT, pred, size=None) == pytest.approx(1 - 0.15**2 / 0.06)
    assert math.isnan(M.bsr_published(GT, GT, GT, size=None))


def test_bsr_published_resizes_bone_gt_pred():
    rng = np.random.default_rng(1)
    cxr, gt, pred = rng.random((3, 6, 5))
    size = (12, 9)
    bone, g, p = (M.resize_bilinear(a, size) for a in (cxr - gt, gt, pred))
    p = p + np.mean(g - p)
    expected = 1 - np.sum(np.maximum(g - p, 0) ** 2) / np.sum(bone**2)
    assert M.bsr_published(cxr, gt, pred, size) == pytest.approx(expected, rel=1e-12)


def test_bsr_symmetric():
    pred = GT + np.array([[0.1, -0.1], [0.0, 0.0]])
    assert M.bsr_symmetric(GT + BONE, GT, pred) == pytest.approx(1 - 0.02 / 0.06)
    assert M.bsr_symmetric(GT + BONE, GT, GT + 0.05) == pytest.approx(1 - 4 * 0.05**2 / 0.06)
    assert M.bsr_symmetric(GT + BONE, GT, GT + BONE) == 0.0  # identity prediction
    assert M.bsr_symmetric(GT + BONE, GT, GT) == 1.0
    mask = np.array([[True, False], [False, False]])
    assert M.bsr_symmetric(GT + BONE, GT, pred, mask) == pytest.approx(1 - 0.01 / 0.01)
    assert math.isnan(M.bsr_symmetric(GT, GT, pred))


def test_mse_psnr():
    gt, pred = np.zeros((4, 4)), np.full((4, 4), 0.1)
    assert M.mse(gt, pred) == pytest.approx(0.01)
    assert M.psnr(gt, pred) == pytest.approx(20.0)
    assert M.psnr(gt, gt) == math.inf
    pred[0, 0] = 0.5  # masked to that pixel alone
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert M.mse(gt, pred, mask) == pytest.approx(0.25)
    assert M.psnr(gt, pred, mask) == pytest.approx(-10 * math.log10(0.25))
    assert math.isnan(M.psnr(gt, pred, np.zeros((4, 4), bool)))


def test_ssim_closed_form_on_one_window():
    # A 7x7 image is exactly one 7x7 window: SSIM is the textbook formula with sample covariance.
    rng = np.random.default_rng(2)
    x, y = rng.random((2, 7, 7))
    n = x.size
    ux, uy = x.mean(), y.mean()
    vx, vy = x.var(ddof=1), y.var(ddof=1)
    vxy = ((x - ux) * (y - uy)).sum() / (n - 1)
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    assert M.ssim(x, y) == pytest.approx(expected, rel=1e-9)
    assert M.ssim(x, x) == pytest.approx(1.0)
    assert M.ssim(x, x, np.ones((7, 7), bool)) == pytest.approx(1.0)


def test_score_pair_faithful_quantises_corrected_does_not():
    # Constant 8x8 images (resizing to 1024² keeps them constant). The prediction is 0.001 above
    # an 8-bit level: faithful rounds it back onto the target, corrected sees MSE 1e-6.
    gt, cxr = np.full((8, 8), 102 / 255), np.full((8, 8), 153 / 255)
    pred = gt + 0.001
    f, gt_s, pred_s = M.score_pair(cxr, gt, pred, "faithful")
    assert gt_s.shape == pred_s.shape == (1024, 1024)
    assert f["bsr"] == 1.0 and f["bsr_sym"] == 1.0 and f["mse"] == 0.0 and f["psnr"] == math.inf
    assert f["ssim"] == pytest.approx(1.0)
    c, _, _ = M.score_pair(cxr, gt, pred, "corrected")
    assert "bsr" not in c
    assert c["mse"] == pytest.approx(1e-6)
    assert c["psnr"] == pytest.approx(60.0)
    assert c["bsr_sym"] == pytest.approx(1 - 1e-6 / 0.2**2)


def test_score_pair_corrected_mask_native_hand_computed():
    gt, cxr = np.full((8, 8), 0.5), np.full((8, 8), 0.7)
    pred = gt.copy()
    pred[:2] = 0.6  # 16 pixels off by 0.1, all inside the mask
    mask = np.zeros((8, 8), bool)
    mask[:4] = True  # 32 pixels
    v, gt_s, _ = M.score_pair(cxr, gt, pred, "corrected", mask, size=None)
    assert gt_s.shape == (8, 8)
    assert v["bsr_sym"] == pytest.approx(1 - 0.16 / 2.56)
    assert v["mse"] == pytest.approx(0.0025)
    assert v["psnr"] == pytest.approx(-10 * math.log10(0.0025))
    assert v["bsr_sym_lung"] == pytest.approx(1 - 0.16 / 1.28)
    assert v["mse_lung"] == pytest.approx(0.005)
    assert v["psnr_lung"] == pytest.approx(-10 * math.log10(0.005))
    assert 0 < v["ssim_lung"] < 1
    # A mask given at the scoring size is used as it is; a third size is an error.
    v1024, _, _ = M.score_pair(cxr, gt, pred, "corrected", np.ones((1024, 1024), bool))
    assert v1024["mse_lung"] == pytest.approx(v1024["mse"])
    with pytest.raises(ValueError, match="size mismatch"):
        M.score_pair(cxr, gt, pred, "corrected", np.ones((5, 5), bool))
    with pytest.raises(ValueError, match="corrected-mode"):
        M.score_pair(cxr, gt, pred, "faithful", mask)


def test_summarize_population_std_and_inf():
    rows = [{"status": "ok", "psnr": v} for v in (1.0, 2.0, 4.0, math.inf, math.nan)]
    rows.append({"status": "failed", "psnr": None})
    s = M.summarize(rows, ["psnr"])["psnr"]
    assert s["mean"] == pytest.approx(7 / 3)
    assert s["std"] == pytest.approx(math.sqrt(42 / 27))  # ddof = 0
    assert (s["n"], s["n_inf"], s["n_nan"]) == (3, 1, 1)
    table = M.markdown_table({"psnr": s, "bsr": {"mean": 0.5, "std": 0.1, "n": 3, "n_inf": 0, "n_nan": 0}},
                             3, 4, "faithful", "1024x1024")
    assert "| PSNR (dB) ↑ | 2.333 ± 1.247 (1 × inf, 1 × NaN excluded) |" in table
    assert "| BSR, published (%) ↑ | 50.000 ± 10.000 |" in table
    assert "3 of 4 images scored" in table


# ------------------------------------------------------------------------------ LPIPS

class RecordingNet(torch.nn.Module):
    """Stands in for LPIPS: records its inputs and returns the mean squared difference per pair."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x0, x1):
        self.calls.append((x0.clone(), x1.clone()))
        return ((x0 - x1) ** 2).mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_scorer_inputs_and_batching():
    net = RecordingNet()
    scorer = M.LpipsScorer(net=net, device="cpu", batch_size=2)
    gt, pred = np.zeros((5, 4, 4)), np.full((5, 4, 4), 0.5)
    pred[4] = 1.0
    # faithful: [0, 1] single channel as is -> (0 - 0.5)² = 0.25; last pair 1.
    np.testing.assert_allclose(scorer(gt, pred, "faithful"), [0.25] * 4 + [1.0])
    assert [c[0].shape for c in net.calls] == [(2, 1, 4, 4), (2, 1, 4, 4), (1, 1, 4, 4)]
    assert float(net.calls[0][1].max()) == 0.5
    net.calls.clear()
    # corrected: 2x - 1 on three channels -> (-1 - 0)² = 1; last pair (-1 - 1)² = 4.
    np.testing.assert_allclose(scorer(gt, pred, "corrected"), [1.0] * 4 + [4.0])
    assert net.calls[0][0].shape == (2, 3, 4, 4) and float(net.calls[0][0].min()) == -1.0


def test_lpips_random_backbone(random_lpips):
    rng = np.random.default_rng(3)
    gt, pred = rng.random((2, 3, 64, 64)).astype(np.float32)
    faithful = random_lpips(gt, pred, "faithful")
    corrected = random_lpips(gt, pred, "corrected")
    assert faithful.shape == (3,) and np.all(faithful > 0) and not np.allclose(faithful, corrected)
    np.testing.assert_allclose(random_lpips(gt, gt, "faithful"), 0.0, atol=1e-7)
    # Same numbers as calling lpips directly: [0, 1] with normalize=False (the published quirk),
    # and normalize=True for the corrected input.
    net = random_lpips.net
    with torch.no_grad():
        x0, x1 = torch.from_numpy(gt[:, None]), torch.from_numpy(pred[:, None])
        np.testing.assert_allclose(faithful, net(x0, x1).flatten().numpy(), rtol=1e-5)
        np.testing.assert_allclose(corrected, net(x0, x1, normalize=True).flatten().numpy(), rtol=1e-5)


def test_lpips_weights_missing_is_reported(no_lpips_weights):
    reason = M.lpips_unavailable_reason()
    assert reason and "alexnet-owt-7be5be79.pth" in reason and str(no_lpips_weights) in reason
    assert M.lpips_weights_path() == no_lpips_weights / "alexnet-owt-7be5be79.pth"
    with pytest.raises(M.LpipsUnavailable, match="alexnet-owt"):
        M.LpipsScorer()
    # A file that is present but not a checkpoint: detected at build time, never downloaded over.
    no_lpips_weights.mkdir(parents=True)
    (no_lpips_weights / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    assert M.lpips_unavailable_reason() is None
    with pytest.raises(M.LpipsUnavailable, match="cannot build LPIPS"):
        M.build_lpips_net()


@pytest.mark.skipif(M.lpips_unavailable_reason() is not None, reason="AlexNet weights not in the torch hub cache")
def test_lpips_pretrained_builds_when_weights_present():
    scorer = M.LpipsScorer(device="cpu")
    x = np.random.default_rng(4).random((1, 64, 64))
    assert scorer(x, x)[0] == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------ pipeline and CLI

def _synthetic_folders(root: Path) -> dict[str, Path]:
    rng = np.random.default_rng(5)
    dirs = {k: root / k for k in ("CXR", "BS", "pred")}
    for name in "abcd":
        gt = rng.integers(0, 200, (32, 32))
        write_gray(dirs["BS"] / f"{name}.png", gt)
        write_gray(dirs["CXR"] / f"{name}.png", gt + 40)
    write_gray(dirs["pred"] / "a.png", rng.integers(0, 255, (32, 32)))
    # b: no prediction; c: wrong size; d: not an image
    write_gray(dirs["pred"] / "c.png", rng.integers(0, 255, (16, 16)))
    (dirs["pred"] / "d.png").write_bytes(b"\x89PNG garbage")
    return dirs


def test_cli_reports_missing_mismatched_unreadable(tmp_path, no_lpips_weights, capsys):
    d = _synthetic_folders(tmp_path)
    (tmp_path / "test.txt").write_text("a\nb\nc\n\nd  # comment\n")
    out = tmp_path / "eval"
    rc = metrics.main(["--cxr", str(d["CXR"]), "--gt", str(d["BS"]), "--pred", str(d["pred"]),
                 "--list", str(tmp_path / "test.txt"), "--out", str(out)])
    assert rc == 1
    err = capsys.readouterr().err
    lines = (out / "metrics_faithful.csv").read_text().splitlines()
    assert lines[0] == "name,status,error,height,width,bsr,bsr_sym,mse,psnr,ssim,lpips"
    rows = {r.split(",")[0]: r for r in lines[1:]}
    assert rows["a"].startswith("a,ok,,32,32,") and rows["a"].endswith(",")  # lpips empty
    assert "failed,missing prediction (not found in" in rows["b"]
    assert "size mismatch: cxr 32x32, gt 32x32, prediction 16x16" in rows["c"]
    assert "unreadable prediction" in rows["d"]
    summary = json.loads((out / "metrics_faithful.json").read_text())
    assert (summary["n_listed"], summary["n_scored"], summary["n_failed"]) == (4, 1, 3)
    assert [f["name"] for f in summary["failures"]] == ["b", "c", "d"]
    assert summary["lpips"]["available"] is False and "alexnet-owt-7be5be79.pth" in summary["lpips"]["reason"]
    assert summary["metrics"]["bsr"]["n"] == 1 and summary["metrics"]["lpips"]["n"] == 0
    for name in "bcd":
        assert f"metrics.py: {name}: " in err
    assert "LPIPS not computed" in err and "3 of 4 images could not be scored" in err


def test_score_folder_report_is_what_the_cli_prints_and_writes(tmp_path, no_lpips_weights, capsys):
    """The library returns the report the CLI writes; its transcript is the CLI's output, line for line;
    a broken link named like an image in the target folder is a failed case, not silently dropped."""
    d = _synthetic_folders(tmp_path)
    (d["BS"] / "e.png").symlink_to(tmp_path / "nowhere.png")
    rc = metrics.main(["--cxr", str(d["CXR"]), "--gt", str(d["BS"]), "--pred", str(d["pred"]), "--out", str(tmp_path / "cli")])
    cap = capsys.readouterr()
    scorer, reason = M.lpips_scorer()
    report = M.score_folder(d["CXR"], d["BS"], d["pred"], None, "faithful", scorer=scorer, lpips_reason=reason,
                            progress=False)
    assert rc == 1 and [f["name"] for f in report.failures] == ["b.png", "c.png", "d.png", "e.png"]
    assert "unreadable gt" in report.failures[-1]["error"]
    csv_path, json_path = report.write(tmp_path / "lib")
    assert json.loads(json_path.read_text()) | {"inputs": None} == \
        json.loads((tmp_path / "cli" / "metrics_faithful.json").read_text()) | {"inputs": None}
    assert csv_path.read_text() == (tmp_path / "cli" / "metrics_faithful.csv").read_text()
    printed = set((cap.out + cap.err).splitlines())
    transcript = report.transcript(tmp_path / "cli").splitlines()
    assert set(transcript) - {""} == printed - {""}
    with pytest.raises(ValueError, match="mode must be one of"):
        M.score_folder(d["CXR"], d["BS"], d["pred"], mode="published")


def test_cli_table_and_require_lpips(tmp_path, no_lpips_weights, capsys):
    d = _synthetic_folders(tmp_path)
    args = ["--cxr", str(d["CXR"]), "--gt", str(d["BS"]), "--pred", str(d["BS"]), "--out", str(tmp_path / "o")]
    assert metrics.main(args + ["--require-lpips"]) == 2
    assert not (tmp_path / "o").exists()  # nothing computed, nothing written
    assert "LPIPS required but unavailable" in capsys.readouterr().err
    # Prediction = target: every pair identical, PSNR inf everywhere.
    assert metrics.main(args + ["--mode", "corrected"]) == 0
    out = capsys.readouterr().out
    assert "| BSR, symmetric (%) ↑ | 100.000 ± 0.000 |" in out
    assert "| PSNR (dB) ↑ | n/a |" in out and "| LPIPS ↓ | unavailable" in out
    assert "4 of 4 images scored (corrected mode, 1024x1024" in out
    summary = json.loads((tmp_path / "o" / "metrics_corrected.json").read_text())
    assert summary["metrics"]["psnr"]["n_inf"] == 4
    with pytest.raises(SystemExit):
        metrics.main(args + ["--native"])  # a corrected-mode option


def test_evaluate_batches_lpips_across_native_sizes(tmp_path, random_lpips):
    rng = np.random.default_rng(6)
    sizes = {"a": 64, "b": 64, "c": 64, "d": 48, "e": 64}
    for name, s in sizes.items():
        gt = rng.integers(0, 200, (s, s))
        write_gray(tmp_path / "BS" / f"{name}.png", gt)
        write_gray(tmp_path / "CXR" / f"{name}.png", gt + 30)
        write_gray(tmp_path / "pred" / f"{name}.png", rng.integers(0, 255, (s, s)))
        write_gray(tmp_path / "mask" / f"{name}.png", np.where(np.arange(s)[:, None] < s // 2, 255, 0) * np.ones((1, s)))
    rows = M.evaluate(list(sizes), tmp_path / "CXR", tmp_path / "BS", tmp_path / "pred", "corrected",
                      tmp_path / "mask", native=True, scorer=random_lpips)
    assert [r["status"] for r in rows] == ["ok"] * 5
    for r in rows:
        gt, pred = (read_image(tmp_path / k / f"{r['name']}.png").pixels for k in ("BS", "pred"))
        assert r["lpips"] == pytest.approx(random_lpips(gt[None], pred[None], "corrected")[0], rel=1e-4)
        assert r["height"] == sizes[r["name"]] and r["mse_lung"] is not None


# ------------------------------------------------------------------------------ real SZCH pairs

# szch_samples (tests/conftest.py): ../shared/data/szch-samples, skipped when absent.

@pytest.mark.parametrize("pair,bsr,psnr", [(0, 0.820, 23.58), (1, 0.661, 24.26)])
def test_real_pairs_identity_and_target(szch_samples, pair, bsr, psnr):
    cxr, gt = (read_image(szch_samples / k / f"{pair}.png").pixels for k in ("CXR", "BS"))
    ident, _, _ = M.score_pair(cxr, gt, cxr, "faithful")
    # The published BSR rewards doing nothing (mean shift + one-sided residual); the symmetric one is 0.
    assert ident["bsr"] == pytest.approx(bsr, abs=5e-4)
    assert ident["bsr_sym"] == 0.0
    assert ident["psnr"] == pytest.approx(psnr, abs=0.01)
    corr, _, _ = M.score_pair(cxr, gt, cxr, "corrected")
    assert corr["bsr_sym"] == 0.0 and corr["psnr"] == pytest.approx(psnr, abs=0.01)
    perfect, _, _ = M.score_pair(cxr, gt, gt, "faithful")
    assert perfect["bsr"] == 1.0 and perfect["bsr_sym"] == 1.0 and perfect["psnr"] == math.inf


def test_real_pairs_cli_identity_with_random_lpips(szch_samples, tmp_path, random_lpips, capsys):
    cxr_dir, gt_dir = szch_samples / "CXR", szch_samples / "BS"
    rows = M.evaluate(["0.png", "1.png"], cxr_dir, gt_dir, cxr_dir, "faithful",
                      scorer=random_lpips)
    assert all(r["lpips"] > 0 for r in rows)
    s = M.summarize(rows, ["bsr"])["bsr"]
    assert s["mean"] == pytest.approx((0.8201 + 0.6613) / 2, abs=1e-3)
    assert s["std"] == pytest.approx((0.8201 - 0.6613) / 2, abs=1e-3)  # population std of two values
    # The CLI on the same folders (LPIPS weights absent here or not, the other metrics are the same).
    rc = metrics.main(["--cxr", str(cxr_dir), "--gt", str(gt_dir), "--pred", str(cxr_dir),
                 "--out", str(tmp_path)])
    assert rc == 0
    assert "| BSR, published (%) ↑ | 74.070 ± 7.937 |" in capsys.readouterr().out


def test_unwritable_output_is_refused_before_scoring(pair_folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        metrics.main(["--cxr", str(pair_folder / "CXR"), "--gt", str(pair_folder / "BS"), "--pred", str(pair_folder / "BS"),
                "--out", str(blocker / "out")])
    assert exc.value.code == 2 and "cannot write output here" in capsys.readouterr().err


def test_cli_list_with_bom_duplicate_or_outside_name(tmp_path, no_lpips_weights, capsys):
    """A BOM is dropped (the first name was not found); a duplicate or a name leaving the folders is one
    usage error naming the list and line, before any scoring; --allow-outside-root reads such a list."""
    d = _synthetic_folders(tmp_path)
    args = ["--cxr", str(d["CXR"]), "--gt", str(d["BS"]), "--pred", str(d["pred"]), "--out", str(tmp_path / "e")]
    (tmp_path / "bom.txt").write_bytes("\ufeffa\n".encode())
    assert metrics.main([*args, "--list", str(tmp_path / "bom.txt")]) == 0
    outside = tmp_path / "secret.png"
    write_gray(outside, np.zeros((32, 32)))
    for text, needle in (("a\nb\na\n", "line 3: 'a' is listed twice (first on line 1)"),
                         (f"a\n{outside}\n", f"line 2: '{outside}' leaves the data folder"),
                         ("a\n../secret.png\n", "line 2: '../secret.png' leaves the data folder")):
        (tmp_path / "l.txt").write_text(text)
        with pytest.raises(SystemExit) as ex:
            metrics.main([*args, "--list", str(tmp_path / "l.txt")])
        err = capsys.readouterr().err
        assert ex.value.code == 2 and "Traceback" not in err and f"{tmp_path / 'l.txt'}: {needle}" in err, err
    # Opted in: the outside file is read for all three roles (what the refusal prevents by default).
    assert metrics.main([*args, "--list", str(tmp_path / "l.txt"), "--allow-outside-root"]) == 0
    assert "../secret.png,ok," in (tmp_path / "e" / "metrics_faithful.csv").read_text()

"""tools.cross_domain on a tiny trained student: trained on one phantom set, scored on another against the
tone curve of its training pairs, the leave-one-out oracle tone curve and the identity; auto lung
masks with the global-path fallback; the one-line errors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data.io import read_image
from data.phantom import write_synthetic_dataset
from data.splits import read_list
from evaluation import apply_tone_curve, fit_from_folders, fit_tone_curve
from tests.conftest import ROOT, smoke_config, write_gray
from stages.dataset import prepare_dataset
from stages.train_ldm import train_ldm
from stages.train_vqgan import train_vqgan
from tools import cross_domain
from utils.config import load_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(student checkpoint, its VQGAN checkpoint, train root, test root): a smoke-size VQGAN, teacher and
    distilled student (one epoch each) on 10 phantoms of 64² (seed 0); the test set is 3 other phantoms
    (seed 7) of 64², with Mask/."""

    base = tmp_path_factory.mktemp("cross")
    train, test = base / "train", base / "test"
    write_synthetic_dataset(train, 10, size=64, seed=0, progress=False, workers=1)
    write_synthetic_dataset(test, 3, size=64, seed=7, progress=False, workers=1)
    prepare_dataset(smoke_config(train, base / "runs"), progress=False)      # demo_trainset.txt
    vq = train_vqgan(smoke_config(train, base / "runs", "vq_train.epochs=1"), progress=False)
    teacher = train_ldm(smoke_config(train, base / "runs", f"ldm_train.vqgan_ckpt={vq}/checkpoints/best.pt",
                                          "ldm_train.epochs=1"), progress=False)
    cfg = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "smoke.yaml", ROOT / "configs" / "distill.yaml"],
                      [f"data.root={train}", f"run.out_dir={base / 'runs'}", "ldm_train.epochs=1",
                       f"distill.teacher_ckpt={teacher}/checkpoints/best.pt"])
    student = train_ldm(cfg, progress=False)
    return student / "checkpoints" / "best.pt", vq / "checkpoints" / "best.pt", train, test


def test_library_main_table_json_and_leave_one_out_oracle(trained, tmp_path):
    ckpt, _, train, test = trained
    out = tmp_path / "out"
    result = cross_domain.main(ckpt, train, test, out, overrides=("sampler.steps=1",), oracle_tone=True)
    names = sorted(p.name for p in (test / "CXR").iterdir())
    saved = json.loads((out / "cross_domain.json").read_text())
    assert result["failures"] == [] and saved["n_test"] == 3 and saved["n_train"] == 8
    assert saved["masks"] == {"mode": "folder", "folder": str(test / "Mask"), "n_with_mask": 3, "without_mask": {}}
    assert list(saved["columns"]) == ["model", "tone", "oracle_tone", "identity"]
    for label, col in saved["columns"].items():
        assert col["n_scored"] == 3, label
        for key in ("bsr_hp32", "bsr_hp64", "bsr_hp32_lung", "psnr", "ssim", "mse"):
            assert col["metrics"][key]["n"] == 3 and col["metrics"][key]["mean"] is not None, (label, key)
    identity = saved["columns"]["identity"]["metrics"]
    assert identity["bsr_hp32"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert identity["bsr_hp64"]["mean"] == pytest.approx(0.0, abs=1e-9)
    # the model ran global-local with the test set's masks, one LCM step
    (run,) = saved["inference"]
    assert run["written"] == 3 and run["sampler"]["steps"] == 1 and run["global_local"]["enabled"]
    # the table: printed and written, every row, one column per scored folder, n = the test pairs
    md = (out / "cross_domain.md").read_text()
    assert result["table"] in md
    lines = [line for line in result["table"].splitlines() if line.startswith("| ")]
    assert [c.strip() for c in lines[0].strip("|").split("|")][1:] == list(cross_domain.COLUMNS.values())
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[1:]] == [r[1] for r in cross_domain.ROWS] + \
        ["n (images scored)"]
    assert lines[1].endswith("| 0.0 ± 0.0 |") and lines[-1] == "| n (images scored) | 3 | 3 | 3 | 3 |"
    # the tone curve is the train split's (never a test pair)
    train_curve = fit_from_folders(train / "CXR", train / "BS", read_list(train / "demo_trainset.txt"))
    written = np.loadtxt(out / "tone_curve" / "tone_curve.txt")
    np.testing.assert_allclose(written, train_curve, atol=1e-8)
    # the oracle: each case's curve is fitted on the other test pairs, not on itself nor on all
    pairs = {n: (read_image(test / "CXR" / n).pixels, read_image(test / "BS" / n).pixels) for n in names}
    curves = json.loads((out / "oracle_tone" / "tone_curves.json").read_text())
    everything = fit_tone_curve(pairs.values())
    for n in names:
        loo = fit_tone_curve(p for m, p in pairs.items() if m != n)
        np.testing.assert_array_equal(np.array(curves[n]), loo)
        assert np.abs(loo - everything).max() > 1e-3
        pred = read_image(out / "oracle_tone" / n).pixels
        assert np.abs(pred - apply_tone_curve(loo, pairs[n][0])).max() <= 0.5 / 255 + 1e-6
    assert (out / "cross_domain.png").stat().st_size > 10_000
    assert saved["figure"]["cases"] == names
    # a second run into the same folder: a case that fails now is not scored from the first run's output
    (tmp_path / "broken").mkdir()
    for sub in ("CXR", "BS", "Mask"):
        shutil.copytree(test / sub, tmp_path / "broken" / sub)
    write_gray(tmp_path / "broken" / "Mask" / names[0], np.full((32, 32), 255, np.uint8))    # not its CXR's size
    assert cross_domain.cli(["--ckpt", str(ckpt), "--train-data", str(train), "--test-data", str(tmp_path / "broken"),
                             "--out", str(out), "--set", "sampler.steps=1", "--figure-cases", "0"]) == 1
    again = json.loads((out / "cross_domain.json").read_text())
    assert {f["name"] for f in again["failures"] if f["stage"] == "inference"} == {names[0]}
    assert not (out / "pred" / names[0]).exists()
    assert all(c["n_scored"] == 2 for c in again["columns"].values())


def test_cli_auto_masks_and_the_global_path_for_a_case_without_lungs(trained, tmp_path, capsys):
    """--masks auto on a test set without Mask/: the segmenter's masks are written and used; a flat
    CXR (no lungs to find) runs through the global path, is named, and has no lung score."""
    ckpt, _, train, test = trained
    data = tmp_path / "real"
    for sub in ("CXR", "BS"):
        shutil.copytree(test / sub, data / sub)
    write_gray(data / "CXR" / "flat.png", np.full((64, 64), 128, np.uint8))
    shutil.copy(test / "BS" / "phantom_0000.png", data / "BS" / "flat.png")
    (data / "CXR" / "unpaired.png").write_bytes((test / "CXR" / "phantom_0001.png").read_bytes())
    test_list = tmp_path / "list.txt"
    test_list.write_text("phantom_0000.png\nphantom_0002.png\nflat.png\n")
    out = tmp_path / "out"
    argv = ["--ckpt", str(ckpt), "--train-data", str(train), "--test-data", str(data), "--test-list", str(test_list),
            "--out", str(out), "--set", "sampler.steps=1", "--masks", "auto", "--figure-cases", "2"]
    assert cross_domain.cli(argv) == 0
    printed = capsys.readouterr()
    saved = json.loads((out / "cross_domain.json").read_text())
    assert printed.out.count("| n (images scored) | 3 | 3 | 3 |") == 1 and "oracle" not in printed.out
    assert "flat.png" in printed.err and "global path" in printed.err
    assert saved["n_test"] == 3 and list(saved["columns"]) == ["model", "tone", "identity"]
    assert saved["masks"]["mode"] == "auto" and list(saved["masks"]["without_mask"]) == ["flat.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["phantom_0000.png", "phantom_0002.png"]
    by_cases = {r["cases"]: r for r in saved["inference"]}
    assert by_cases["as configured"]["n"] == 2 and by_cases["as configured"]["global_local"]["enabled"]
    assert by_cases["global path (no lung mask)"]["n"] == 1
    assert not by_cases["global path (no lung mask)"]["global_local"]["enabled"]
    for col in saved["columns"].values():
        assert col["n_scored"] == 3 and col["metrics"]["bsr_hp32"]["n"] == 3
        assert col["metrics"]["bsr_hp32_lung"]["n"] == 2                  # over the segmented cases only
    assert "(n = 2)" in (out / "cross_domain.md").read_text()
    assert saved["figure"]["cases"] == ["phantom_0000.png", "phantom_0002.png"]
    assert (out / "pred" / "flat.png").is_file()
    # without a list: every CXR with a target of its name; the unpaired one is named
    assert cross_domain.find_test_cases(data, None) == ["flat.png", "phantom_0000.png", "phantom_0001.png",
                                                        "phantom_0002.png"]
    assert "unpaired.png" in capsys.readouterr().err


def _errors(trained, tmp_path):
    ckpt, vq, train, test = trained
    no_list = tmp_path / "no_list"
    for sub in ("CXR", "BS"):
        shutil.copytree(train / sub, no_list / sub)
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text("phantom_0000.png\nmissing.png\n")
    one = tmp_path / "one.txt"
    one.write_text("phantom_0000.png\n")
    base = {"--ckpt": str(ckpt), "--train-data": str(train), "--test-data": str(test), "--out": str(tmp_path / "o")}
    return [({"--ckpt": str(tmp_path / "nope.pt")}, [], "nope.pt: checkpoint not found"),
            ({"--ckpt": str(vq)}, [], f"{vq}: is a 'vqgan' checkpoint, expected 'ldm'"),
            ({"--test-data": str(tmp_path / "absent")}, [], f"{tmp_path / 'absent' / 'CXR'}: folder not found"),
            ({"--train-data": str(no_list)}, [], f"{no_list / 'demo_trainset.txt'}: train list not found"),
            ({"--test-list": str(bad_list)}, [], f"{test / 'CXR' / 'missing.png'}: not found"),
            ({"--test-data": str(no_list)}, ["--masks", "folder"], f"{no_list / 'Mask'}: folder not found"),
            ({"--test-list": str(one)}, ["--oracle-tone"], "needs at least 2 test pairs"),
            ({}, ["--set", "unet.model_channels=64"], "unet.model_channels is fixed by the checkpoint")], base


def test_errors_are_one_line_and_exit_2_before_any_work(trained, tmp_path, capsys):
    cases, base = _errors(trained, tmp_path)
    for changed, extra, message in cases:
        argv = [a for k, v in {**base, **changed}.items() for a in (k, v)] + extra
        assert cross_domain.cli(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (message, err)
        assert not (tmp_path / "o").exists(), message


def test_the_command_line_runs_as_a_module(trained, tmp_path):
    ckpt, vq, train, test = trained
    res = subprocess.run([sys.executable, "-m", "tools.cross_domain", "--ckpt", str(vq), "--train-data", str(train),
                          "--test-data", str(test), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2 and res.stderr == f"error: {vq}: is a 'vqgan' checkpoint, expected 'ldm'\n"


@pytest.mark.slow
def test_the_real_pairs_get_auto_masks(trained, tmp_path, szch_samples):
    """The SZCH sample pairs (1024², no Mask/): masks default to the built-in segmenter, which finds both
    lungs of both; every column is scored on both pairs, in and out of the lungs (about 15 s: scoring at 1024²)."""
    ckpt, _, train, _ = trained
    result = cross_domain.main(ckpt, train, szch_samples, tmp_path / "o", overrides=("sampler.steps=1",),
                               figure_cases=0)
    assert result["failures"] == [] and result["n_test"] == 2
    assert result["masks"]["mode"] == "auto" and result["masks"]["n_with_mask"] == 2
    assert sorted(p.name for p in (tmp_path / "o" / "masks").iterdir()) == ["0.png", "1.png"]
    for col in result["columns"].values():
        assert col["n_scored"] == 2 and col["metrics"]["bsr_hp32_lung"]["n"] == 2
    assert result["columns"]["identity"]["metrics"]["bsr_hp32"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert result["figure"]["cases"] == [] and not (tmp_path / "o" / "cross_domain.png").exists()

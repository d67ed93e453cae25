"""End to end: the demo pipeline (make demo) learns, on the synthetic test split.

Runs every stage with configs/demo.yaml, as `make demo` does (about 10-15 minutes on 2 cores), and
checks that the distilled 4-step global-local model clearly beats the identity baseline
(prediction = CXR), and that distillation costs little against the 50-step teacher. The thresholds
are set well below what the demo measures (README, "Demo") and well above what a broken stage
gives: an untrained or collapsed VQGAN, a diffusion model that did not learn, or a sampler bug all
land at or below the identity baseline.
"""
from __future__ import annotations

import json
import re

import pytest

from utils.scripts import load_script

MIN_PSNR_GAIN_DB = 2.0        # over the identity baseline
MIN_BSR_SYM = 0.40            # symmetric BSR: 0 = output equals input, 1 = perfect
MAX_STUDENT_GAP_DB = 1.5      # PSNR of the 4-step student vs the 50-step teacher


@pytest.mark.slow
def test_demo_pipeline_learns(tmp_path):
    demo = load_script("demo.py")
    summary = demo.main(tmp_path / "runs", overrides=(f"data.root={tmp_path / 'data'}",), progress=False)
    m, t, ident = (summary["metrics"][k] for k in ("model", "teacher", "identity"))
    assert m["psnr"]["mean"] >= ident["psnr"]["mean"] + MIN_PSNR_GAIN_DB, (m["psnr"], ident["psnr"])
    assert m["bsr_sym"]["mean"] >= MIN_BSR_SYM, m["bsr_sym"]
    assert m["ssim"]["mean"] > ident["ssim"]["mean"]
    assert t["psnr"]["mean"] - m["psnr"]["mean"] <= MAX_STUDENT_GAP_DB
    html = (tmp_path / "runs" / "report.html").read_text()
    assert len(re.findall(r"type='range'", html)) == m["psnr"]["n"]
    assert json.loads((tmp_path / "runs" / "demo_summary.json").read_text())["report"].endswith("report.html")

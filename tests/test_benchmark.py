"""tools.benchmark in --quick mode: every scenario runs its real code path and reports consistent counts."""
from __future__ import annotations

import json

import torch

from tools import benchmark


def test_quick_benchmark(tmp_path, capsys):
    rows = benchmark.main("quick", out=tmp_path / "bench.json", precisions=("fp32",), subprocesses=False)
    by = {r["scenario"]: r for r in rows}
    assert [r["scenario"] for r in rows] == ["bs-ldm", "gl-lcm", "ours-whole", "ours"]
    # UNet calls: one per step for one path, two per step sequential, one per step batched
    assert by["bs-ldm"]["unet_calls"] == by["bs-ldm"]["steps"] == 8
    assert by["gl-lcm"]["unet_calls"] == 2 * by["gl-lcm"]["steps"] == 16
    assert by["ours"]["unet_calls"] == by["ours"]["steps"] == 4
    assert by["ours"]["local_crop"] and not by["ours-whole"]["local_crop"]
    for r in rows:
        assert set(r["seconds"]) == {"encode", "sample", "decode", "fusion", "total"}
        assert all(v >= 0 for v in r["seconds"].values()) and r["peak_memory_bytes"] > 0
        assert r["precision"] == "fp32" and "threads" in r["device"]
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["rows"] == rows and saved["flops"]["ours"] <= saved["flops"]["ours-whole"]
    out = capsys.readouterr().out
    assert "| ours | fp32 | lcm, 4 | 4 |" in out and "work per image: gl-lcm" in out


def test_max_steps_extrapolates(capsys):
    (row,) = benchmark.main("quick", max_steps=2, scenarios=["bs-ldm"], precisions=("fp32",), subprocesses=False)
    assert row["extrapolated"] and row["steps_timed"] == 2 and row["unet_calls"] == 8
    assert "(timed 2, extrapolated)" in capsys.readouterr().out


def test_plan_drops_an_auto_that_is_fp32(monkeypatch):
    import models.precision as P

    cpu = torch.device("cpu")
    monkeypatch.setattr(P, "resolve_precision", lambda name, device: ("fp32" if name in ("fp32", "auto") else name, ""))
    assert benchmark.plan(["gl-lcm", "ours"], ["fp32", "auto"], cpu) == [
        ("gl-lcm", "fp32", True), ("ours", "fp32", False), ("ours", "fp32", True)]
    monkeypatch.setattr(P, "resolve_precision", lambda name, device: ("bf16" if name == "auto" else name, ""))
    assert benchmark.plan(["ours"], ["fp32", "auto"], cpu) == [("ours", "fp32", False), ("ours", "fp32", True),
                                                               ("ours", "auto", True)]


def test_flops_shrink_with_the_lung_box():
    f = benchmark.flops_per_image("demo")
    assert 0 < f["box_fraction"] <= 1 and f["encode_box"] <= f["encode"] and f["ours"] <= f["ours-whole"] < f["gl-lcm"]

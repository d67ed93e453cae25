"""benchmark.py in --quick mode: every scenario runs its real code path and reports consistent counts."""
from __future__ import annotations

import json

from tests.scripts import load_script

benchmark = load_script("benchmark.py")


def test_quick_benchmark(tmp_path, capsys):
    rows = benchmark.main("quick", out=tmp_path / "bench.json", subprocesses=False)
    by = {r["scenario"]: r for r in rows}
    assert set(by) == {"bs-ldm", "gl-lcm", "ours"}
    # UNet calls: one per step for one path, two per step sequential, one per step batched
    assert by["bs-ldm"]["unet_calls"] == by["bs-ldm"]["steps"] == 8
    assert by["gl-lcm"]["unet_calls"] == 2 * by["gl-lcm"]["steps"] == 16
    assert by["ours"]["unet_calls"] == by["ours"]["steps"] == 4
    for r in rows:
        assert set(r["seconds"]) == {"encode", "sample", "decode", "fusion", "total"}
        assert all(v >= 0 for v in r["seconds"].values()) and r["peak_memory_bytes"] > 0
    assert json.loads((tmp_path / "bench.json").read_text()) == rows
    out = capsys.readouterr().out
    assert "| ours | lcm | 4 | 4 |" in out


def test_max_steps_extrapolates(capsys):
    (row,) = benchmark.main("quick", max_steps=2, scenarios=["bs-ldm"], subprocesses=False)
    assert row["extrapolated"] and row["steps_timed"] == 2 and row["unet_calls"] == 8
    assert "(extrapolated from 2)" in capsys.readouterr().out

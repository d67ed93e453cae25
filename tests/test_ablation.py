"""tools.ablation on a tiny trained model: the plan, the tables, the histogram figure, and that each row
is the run ldm_eval.py + metrics.py would make with the row's overrides."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from tools import ablation
from data.io import read_image
from stages import suppress
from stages.train_ldm import train_ldm
from stages.train_vqgan import train_vqgan
from tests.conftest import smoke_config, tiny_dataset
from utils.checkpoint import load_checkpoint





@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(dataset root, {"offset": ckpt, "no-offset": ckpt}). The second is the same network with
    diffusion.offset_noise = 0 written into its config: the runner reads the training setting from
    there, and training a second model would only cost time here."""
    base = tmp_path_factory.mktemp("ablation")
    root = tiny_dataset(base / "ds")
    vq = train_vqgan(smoke_config(root, base / "runs", "vq_train.epochs=1"), progress=False)
    # ε-prediction (the papers'; the demo config predicts v): after one epoch its x̂0 lies far outside
    # the clip range, so the TAT rows below differ visibly (a v-model's x̂0 stays inside it).
    run = train_ldm(
        smoke_config(root, base / "runs", f"ldm_train.vqgan_ckpt={vq}/checkpoints/best.pt", "ldm_train.epochs=1",
                     "diffusion.prediction=epsilon"),
        progress=False)
    ckpt = run / "checkpoints" / "best.pt"
    raw = load_checkpoint(ckpt)
    raw["config"]["diffusion"]["offset_noise"] = 0.0
    no_offset = base / "no_offset.pt"
    torch.save(raw, no_offset)
    return root, {"offset": str(ckpt), "no-offset": str(no_offset)}


def test_plan_rows_and_shared_runs(models, tmp_path):
    _, ckpts = models
    rows = ablation.plan_rows(ckpts, samplers=("lcm", "ddim"), steps=(1, 2))
    tables = [r.table for r in rows]
    assert tables.count("offset_tat") == 4 and tables.count("guidance") == 4 and tables.count("fusion") == 3
    assert tables.count("sampler") == 4
    ot = [r.cells for r in rows if r.table == "offset_tat"]
    assert [(c["Model"], c["Offset noise"], c["TAT"]) for c in ot] == [
        ("offset", "✓ (c = 0.1)", "✓"), ("offset", "✓ (c = 0.1)", "✗"), ("no-offset", "✗", "✓"), ("no-offset", "✗", "✗")]
    # the inference-time tables use the first model only
    assert {r.model for r in rows if r.table != "offset_tat"} == {"offset"}
    runs = ablation.resolve_runs(rows, tmp_path, "test", (), None, None)
    # the smoke model samples with lcm x 2, no LEG (demo.yaml), Poisson fusion, TAT on: one run serves four rows
    base = next(r for r in rows if r.table == "offset_tat").run
    shared = [r for r in rows if r.run is base]
    assert {(r.table, tuple(r.cells.values())[0]) for r in shared} == {
        ("offset_tat", "offset"), ("guidance", "Vanilla guidance"), ("fusion", "Poisson fusion"), ("sampler", "lcm")}
    assert len(runs) == len(rows) - 3
    with pytest.raises(ValueError, match="at most 50"):
        ablation.plan_rows(ckpts, tables=("sampler",), samplers=("lcm",), steps=(64,))
    with pytest.raises(ValueError, match="unknown table"):
        ablation.plan_rows(ckpts, tables=("offset",))
    with pytest.raises(ValueError, match="two checkpoints are labelled"):
        ablation.parse_ckpts([f"a={ckpts['offset']}", f"a={ckpts['no-offset']}"])
    assert ablation.parse_ckpts([ckpts["offset"]]) == {"000-smoke": ckpts["offset"]}


def test_dry_run_writes_commands_only(models, tmp_path):
    _, ckpts = models
    result = ablation.main([f"m={ckpts['offset']}"], tmp_path, tables=("guidance",), modes=("corrected",),
                           overrides=("sampler.steps=1",), dry_run=True)
    text = (tmp_path / "commands.sh").read_text()
    assert text.count("python ldm_eval.py") == 4 and text.count("python metrics.py") == 4
    assert "--set global_local.leg_mode=global_cond" in text and "--set sampler.steps=1" in text
    assert not (tmp_path / "runs").exists() and result["tables"] == {}


def test_tables_figure_and_rows_are_real_runs(models, tmp_path):
    root, ckpts = models
    result = ablation.main([f"{k}={v}" for k, v in ckpts.items()], tmp_path, samplers=("lcm",), steps=(1, 2),
                           modes=("corrected",), limit=1)
    assert result["failures"] == []
    md = {t: (tmp_path / "tables" / f"{t}.md").read_text() for t in ablation.TABLES}
    for table, labels in (("offset_tat", ["| offset | ✓ (c = 0.1) | ✓ |", "| offset | ✓ (c = 0.1) | ✗ |",
                                          "| no-offset | ✗ | ✓ |", "| no-offset | ✗ | ✗ |"]),
                          ("guidance", [f"| {label} | {mode} |" for mode, label in ablation.GUIDANCE]),
                          ("fusion", [f"| {label} | {mode} |" for mode, label in ablation.FUSION]),
                          ("sampler", ["| lcm | 1 |", "| lcm | 2 |"])):
        body = [line for line in md[table].splitlines() if line.startswith("| ") and "---" not in line]
        assert len(body) == 3 + len(labels), table              # header, one line per row, two baselines
        assert body[-2].startswith("| tone curve (baseline) |") and body[-1].startswith("| identity (CXR, baseline) |")
        assert "BSR, high-pass σ = W/32 (%) ↑" in body[0]
        for line, label in zip(body[1:], labels + ["| tone curve", "| identity"]):
            assert line.startswith(label), (table, line)
            assert line.rstrip(" |").split(" | ")[-1 if table != "sampler" else -2] == "1"   # n = --limit
        assert "PSNR (dB) ↑" in body[0] and "±" in body[1]
    assert "s / image" in md["sampler"]
    assert (tmp_path / "ablation.md").read_text().count("## ") == 4
    fig = tmp_path / "figures" / "offset_tat_histograms.png"
    assert fig.is_file() and fig.stat().st_size > 5000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["histogram_overlap"]) == 4 and all(0 <= v <= 1 for v in saved["histogram_overlap"].values())

    # the identity baseline row is the CXR scored against the target: high-pass BSR exactly 0
    identity = json.loads((tmp_path / "runs" / "baselines" / "identity" / "metrics" / "metrics_corrected_native.json")
                          .read_text())
    assert identity["metrics"]["bsr_hp32"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert (tmp_path / "runs" / "baselines" / "tone-curve" / "pred" / "tone_curve.txt").is_file()

    # every table cell is the metrics.py report of its run
    rows = [r for r in csv.DictReader(open(tmp_path / "tables" / "guidance.csv")) if r["model"] in ckpts]
    assert {r["row"] for r in rows} == {f"{label} / {mode}" for mode, label in ablation.GUIDANCE}
    for r in rows:
        if r["metric"] == "psnr":
            report = json.loads((tmp_path / "runs" / "offset" / r["run"] / "metrics" / "metrics_corrected_native.json").read_text())
            assert float(r["mean"]) == pytest.approx(report["metrics"]["psnr"]["mean"])
            assert f"{report['metrics']['psnr']['mean']:.3f} ± {report['metrics']['psnr']['std']:.3f}" in md["guidance"]

    # a row is exactly ldm_eval.py with the row's --set items: rerun one directly and compare pixels
    row = next(x for x in saved["rows"] if x["table"] == "offset_tat" and x["cells"]["TAT"] == "✗"
               and x["model"] == "offset")
    sets = saved["runs"][row["run"]]["sets"]
    assert "sampler.clip=false" in sets
    args = suppress.build_parser().parse_args(["--ckpt", ckpts["offset"], *[a for s in sets for a in ("--set", s)]])
    suppress.suppress_images(suppress.config_for(args), ckpts["offset"], out_dir=tmp_path / "direct", progress=False)
    name = (tmp_path / "runs" / "lists" / "offset" / "demo_testset.txt").read_text().split()[0]
    np.testing.assert_array_equal(read_image(tmp_path / "direct" / name).pixels,
                                  read_image(f"{row['run']}/pred/{name}").pixels)
    tat_on = next(x["run"] for x in saved["rows"] if x["table"] == "offset_tat" and x["cells"]["TAT"] == "✓"
                  and x["model"] == "offset")
    assert not np.array_equal(read_image(f"{tat_on}/pred/{name}").pixels, read_image(f"{row['run']}/pred/{name}").pixels)

    # resumable: a second call reuses the outputs and gives the same tables
    again = ablation.main([f"{k}={v}" for k, v in ckpts.items()], tmp_path, tables=("fusion",), modes=("corrected",),
                          limit=1)
    assert again["tables"]["fusion"] == md["fusion"]


def test_missing_masks_fail_before_any_run(models, tmp_path):
    root, ckpts = models
    shutil.copytree(root, tmp_path / "ds", ignore=shutil.ignore_patterns("Mask"))
    with pytest.raises(FileNotFoundError, match="need lung masks"):
        ablation.main([ckpts["offset"]], tmp_path / "out", tables=("offset_tat", "guidance"),
                      overrides=(f"data.root={tmp_path / 'ds'}",))
    assert not (tmp_path / "out" / "runs").exists()


@pytest.mark.parametrize("text", ["{broken", "[1]", '{"seconds_per_image": "fast"}', '{"seconds_per_image": {"a": NaN}}',
                                  "[" * 100_000])
def test_damaged_timing_json_is_no_timing(tmp_path, text):
    """A damaged timing.json in a run folder costs only the timing column, never a traceback."""
    (tmp_path / "timing.json").write_text(text)
    assert ablation.seconds_per_image(tmp_path / "timing.json") is None
    (tmp_path / "timing.json").write_text('{"seconds_per_image": {"encode": 0.5, "sample": 1}}')
    assert ablation.seconds_per_image(tmp_path / "timing.json") == {"encode": 0.5, "sample": 1.0}
    assert ablation.seconds_per_image(tmp_path / "none.json") is None

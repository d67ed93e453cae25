"""The whole pipeline on the embedded synthetic default: what `make demo` runs.

Usage:
    python demo.py                                  # configs/demo.yaml, everything under runs/demo/
    python demo.py --out runs/demo2 --set synthetic.n=128

Stages, each the real script's ``main`` with ``configs/demo.yaml`` (no shortcut code path):

    1. data        dataSegmentation.py --synthetic: phantom pairs, lung masks, masked copies, split
    2. vqgan       vq-gan_train.py
    3. diffusion   ldm_train.py (the teacher)
    4. distill     ldm_train.py with configs/distill.yaml (+ configs/demo-distill.yaml)
    5. inference   ldm_eval.py on the test split: global + local paths, LEG, Poisson fusion, 4 LCM steps;
                   the teacher too, with 50 LCM steps (GL-LCM's sampler) and 50 DDIM steps (the ODE
                   solution the student is distilled towards), to measure what distillation costs
    6. metrics     metrics.py for the student, both teacher runs and the identity baseline (prediction = CXR)
    7. benchmark   benchmark.py at the demo size
    8. report      report.py -> <out>/report.html (open it in a browser; no server needed)

Prints the metrics table at the end; ``<out>/demo_summary.json`` holds the figures and the stage times.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import dataSegmentation
import metrics as metrics_script
import report as report_script
from utils.atomic import atomic_write_text
from utils.config import ConfigError, load_config
from utils.scripts import load_script

ROOT = Path(__file__).resolve().parent


def main(out: str | Path = "runs/demo", overrides: tuple[str, ...] = (), progress: bool = True,
         extra_configs: tuple[str | Path, ...] = (), bench_max_steps: int | None = 100) -> dict:
    """Run every stage; return the summary (metrics of model and identity, stage times, paths).

    ``extra_configs`` are merged after configs/demo.yaml in every stage (the tests pass smoke.yaml).
    """
    out = Path(out)
    base = [ROOT / "configs" / "demo.yaml", *map(Path, extra_configs)]
    sets = [f"run.out_dir={out}", *overrides]
    cfg = load_config(base, sets)
    times: dict[str, float] = {}

    def stage(name: str):
        print(f"\n=== {name} ===", flush=True)
        return _Timer(times, name)

    with stage("1 data: synthetic phantoms, masks, split"):
        dataSegmentation.main(cfg, synthetic=0, force=True, progress=progress)
    with stage("2 VQGAN"):
        vq_run = load_script("vq-gan_train.py").main(cfg, progress=progress)
    ldm_train = load_script("ldm_train.py")
    with stage("3 latent diffusion (teacher)"):
        teacher_run = ldm_train.main(load_config(base, sets + [f"ldm_train.vqgan_ckpt={vq_run}/checkpoints/best.pt"]),
                                     progress=progress)
    with stage("4 consistency distillation"):
        dcfg = load_config(base + [ROOT / "configs" / "distill.yaml", ROOT / "configs" / "demo-distill.yaml"],
                           sets + [f"distill.teacher_ckpt={teacher_run}/checkpoints/best.pt"])
        student_run = ldm_train.main(dcfg, progress=progress)
    ldm_eval = load_script("ldm_eval.py")
    ckpt = student_run / "checkpoints" / "best.pt"
    pred = student_run / "eval" / "test"
    with stage("5 inference: global-local, 4 LCM steps"):
        ecfg = ldm_eval.config_for(ldm_eval.build_parser().parse_args(["--ckpt", str(ckpt), *_set_args(overrides)]))
        ldm_eval.main(ecfg, ckpt, split="test", out_dir=pred, overwrite=True, progress=progress)
        teacher_ckpt = teacher_run / "checkpoints" / "best.pt"
        teacher_preds = {name: teacher_run / "eval" / f"test-{name}50" for name in ("lcm", "ddim")}
        for name, teacher_pred in teacher_preds.items():
            tcfg = ldm_eval.config_for(ldm_eval.build_parser().parse_args(
                ["--ckpt", str(teacher_ckpt), "--sampler", name, "--steps", "50", *_set_args(overrides)]))
            ldm_eval.main(tcfg, teacher_ckpt, split="test", out_dir=teacher_pred, overwrite=True, progress=progress)
    root = Path(cfg.data.root)
    test_list = root / f"{cfg.data.name}_testset.txt"
    mdir = out / "metrics"
    with stage("6 metrics"):
        common = ["--cxr", str(root / "CXR"), "--gt", str(root / "BS"), "--list", str(test_list)]
        for label, pred_dir in (("model", pred), ("teacher", teacher_preds["lcm"]),
                                ("teacher_ddim", teacher_preds["ddim"]), ("identity", root / "CXR")):
            for mode in ("corrected", "faithful"):
                extra = ["--native"] if mode == "corrected" else []
                with contextlib.redirect_stdout(io.StringIO()):
                    metrics_script.main([*common, "--pred", str(pred_dir), "--mode", mode, *extra,
                                         "--out", str(mdir / label)])
    with stage("7 benchmark"):
        bench_json = out / "benchmark.json"
        load_script("benchmark.py").main("quick" if extra_configs else "demo", max_steps=bench_max_steps,
                                         out=bench_json)
    labels = ("model", "teacher_ddim", "teacher", "identity")
    summaries = {label: json.loads((mdir / label / "metrics_corrected_native.json").read_text()) for label in labels}
    with stage("8 report"):
        html_path = report_script.main(
            root, pred, test_list, out / "report.html",
            metrics={"model (distilled, 4 steps, global-local)": mdir / "model" / "metrics_corrected_native.json",
                     "teacher (50 DDIM steps, global-local)": mdir / "teacher_ddim" / "metrics_corrected_native.json",
                     "teacher (50 LCM steps, global-local)": mdir / "teacher" / "metrics_corrected_native.json",
                     "identity (prediction = CXR)": mdir / "identity" / "metrics_corrected_native.json"},
            benchmark=bench_json,
            curves={"VQGAN": vq_run / "curves.png", "diffusion": teacher_run / "curves.png",
                    "distillation": student_run / "curves.png"},
            title="Bone suppression demo (synthetic phantoms)",
            notes=[f"Runs: {vq_run}, {teacher_run}, {student_run}. Stage times (s): "
                   + ", ".join(f"{k.split(' ')[1]} {v:.0f}" for k, v in times.items())])
    summary = {"runs": {"vqgan": str(vq_run), "teacher": str(teacher_run), "student": str(student_run)},
               "predictions": str(pred), "report": str(html_path), "seconds": times,
               "metrics": {label: {k: v for k, v in s["metrics"].items()} for label, s in summaries.items()}}
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print("\n| test split (corrected, native) | student, 4 LCM steps | teacher, 50 DDIM steps | teacher, 50 LCM steps "
          "| identity (CXR) |\n|---|---|---|---|---|")
    for key, label, scale in (("bsr_sym", "BSR, symmetric (%)", 100), ("psnr", "PSNR (dB)", 1),
                              ("mse", "MSE (10⁻³)", 1000), ("ssim", "SSIM", 1)):
        cells = [f"{summary['metrics'][c][key]['mean'] * scale:.3f} ± {summary['metrics'][c][key]['std'] * scale:.3f}"
                 for c in labels]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(f"\nreport: {html_path}   total {sum(times.values()):.0f} s")
    return summary


class _Timer:
    def __init__(self, times: dict, name: str):
        self.times, self.name = times, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.times[self.name] = time.perf_counter() - self.t0
        return False


def _set_args(overrides) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the whole pipeline on the synthetic demo data.")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--config", nargs="*", default=[], metavar="FILE", help="overlays after configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args()
    try:
        main(args.out, tuple(args.overrides), args.progress, tuple(args.config))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

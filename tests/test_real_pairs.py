"""A learning check on real radiographs: the demo-size pipeline, trained on crops of one real SZCH
pair, suppresses bones in crops of the other pair better than that pair's tone-curve baseline,
on the band-limited BSR (the score a global intensity change cannot raise).

Both pairs are scaled to 256² (the demo's native size, ribs about 8 px wide) and cut into 64²
crops from the chest; the train crops come from pair 0 only, the test crops from pair 1 only. The
bands are those of the whole 256² film (sigma = 256/32 = 8 px and 256/64 = 4 px), not of the crop.
The VQGAN and the teacher have the demo's widths; the teacher is sampled on the global path (the
crops have no lung masks) with 4 LCM steps, as the distilled student is in the demo.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation as M
from data.crops import write_crops
from data.io import read_image
from data.splits import write_split
from evaluation.tone_curve import apply_tone_curve, fit_from_folders
from utils.config import load_config
from stages import suppress
from stages.train_ldm import train_ldm
from stages.train_vqgan import train_vqgan

ROOT = Path(__file__).resolve().parents[1]
FILM, CROP = 256, 64
SIGMA_SCALE = {"hp32": CROP * 32 / FILM, "hp64": CROP * 64 / FILM}   # band of the 256² film, on a 64² crop


def _pair(szch: Path, i: int):
    return tuple(read_image(szch / d / f"{i}.png").pixels for d in ("CXR", "BS"))


def _scores(root: Path, names: list[str], pred: dict[str, np.ndarray]) -> dict[str, float]:
    out = {}
    for band, scale in SIGMA_SCALE.items():
        vals = []
        for n in names:
            cxr, bs = (read_image(root / d / n).pixels for d in ("CXR", "BS"))
            vals.append(M.band_bsr(cxr, bs, pred[n], scale))
        out[band] = float(np.mean(vals))
    return out


@pytest.mark.slow
def test_beats_the_tone_curve_on_real_crops(szch_samples, tmp_path):
    root = tmp_path / "crops"
    train = write_crops(root, [_pair(szch_samples, 0)], n=224, size=CROP, scale=FILM / 1024, prefix="train", seed=0)
    test = write_crops(root, [_pair(szch_samples, 1)], n=32, size=CROP, scale=FILM / 1024, prefix="test", seed=1)
    write_split({"train": train[:192], "val": train[192:], "test": test}, root, "real")
    sets = [f"data.root={root}", "data.name=real", f"data.image_size={CROP}", "data.use_masked=false",
            f"run.out_dir={tmp_path / 'runs'}", "vq_train.epochs=20", "vq_train.milestones=[15]",
            "vq_train.val_every=20", "vq_train.ckpt_every=20", "ldm_train.epochs=40", "ldm_train.milestones=[34]",
            "ldm_train.val_every=40", "ldm_train.ckpt_every=40", "global_local.enabled=false"]
    # the phantom demo's networks (128² model size, VQGAN [32, 64] with MS-SSIM), which these figures were
    # measured with; the real-anatomy demo's first stage is sized for 256² views
    base = [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "demo-phantom.yaml"]
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        vq_run = train_vqgan(load_config(base, sets), progress=False)
        teacher = train_ldm(
            load_config(base, sets + [f"ldm_train.vqgan_ckpt={vq_run}/checkpoints/best.pt"]), progress=False)
        ckpt = teacher / "checkpoints" / "best.pt"
        args = ["--ckpt", str(ckpt), "--sampler", "lcm", "--steps", "4", "--global-only",
                *[a for s in sets[:4] for a in ("--set", s)]]
        suppress.suppress_images(suppress.config_for(suppress.build_parser().parse_args(args)), ckpt, split="test",
                      out_dir=tmp_path / "pred", progress=False)
    finally:
        torch.set_num_threads(threads)
    curve = fit_from_folders(root / "CXR", root / "BS", train[:192])
    model = _scores(root, test, {n: read_image(tmp_path / "pred" / n).pixels for n in test})
    tone = _scores(root, test, {n: apply_tone_curve(curve, read_image(root / "CXR" / n).pixels) for n in test})
    print(f"real crops, band-limited BSR: model {model}, tone curve {tone}")
    # measured on a 2-core Intel Xeon: model 0.385 / 0.226, tone curve 0.058 / 0.058 (3 minutes)
    assert model["hp32"] > tone["hp32"] + 0.15, (model, tone)
    assert model["hp64"] > tone["hp64"] + 0.08, (model, tone)

"""ldm_train.py and ldm_eval.py end to end on a tiny dataset and VQGAN (CPU)."""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data.io import read_image
from tests.conftest import ROOT, fill_disk_after, smoke_config, tiny_dataset, untrained_ldm, write_gray
import stages.train_ldm
from stages import suppress
from stages.train_ldm import resolve_config as resolve_training_config
from stages.train_ldm import train_ldm
from stages.train_vqgan import train_vqgan
from utils.checkpoint import CheckpointError, load_checkpoint
from utils.config import ConfigError, config_from_dict



@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """(dataset root, VQGAN checkpoint) shared by the tests of this module."""
    base = tmp_path_factory.mktemp("ldm")
    root = tiny_dataset(base / "ds")
    run = train_vqgan(smoke_config(root, base / "runs", "vq_train.epochs=1"), progress=False)
    return root, run / "checkpoints" / "best.pt"


def cfg_for(stage1, out, *overrides):
    root, vq = stage1
    return smoke_config(root, out, f"ldm_train.vqgan_ckpt={vq}", *overrides)


def latest(run):
    return load_checkpoint(run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["file"])


def test_train_run_folder_and_checkpoint(stage1, tmp_path):
    run = train_ldm(cfg_for(stage1, tmp_path), progress=False)
    for f in ("config.yaml", "log.txt", "metrics.csv", "curves.png", "samples/val_0002.png", "checkpoints/best.pt"):
        assert (run / f).is_file(), f
    ckpt = latest(run)
    assert ckpt["kind"] == "ldm" and set(ckpt["state"]) == {"unet", "ema", "opt", "sched"}
    assert ckpt["step"] == 6 and ckpt["extra"]["latent_size"] == 8    # 9 pairs / 4 = 3 it/epoch; 32 px / f=4
    # EMA differs from the raw weights after training, and the LR dropped at the epoch-1 milestone
    some = next(k for k, v in ckpt["state"]["unet"].items() if v.dtype.is_floating_point and v.abs().sum() > 0)
    assert not torch.equal(ckpt["state"]["unet"][some], ckpt["state"]["ema"][some])
    tc = cfg_for(stage1, tmp_path).ldm_train
    assert ckpt["state"]["sched"]["_last_lr"] == pytest.approx([tc.lr * tc.gamma])
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["split"] for r in rows].count("val") == 2


def test_resume_is_exact(stage1, tmp_path):
    a = train_ldm(cfg_for(stage1, tmp_path / "a"), progress=False)
    b = train_ldm(cfg_for(stage1, tmp_path / "b", "ldm_train.epochs=1"), progress=False)
    train_ldm(cfg_for(stage1, tmp_path / "b", "ldm_train.epochs=2"), resume=b, progress=False)
    sa, sb = latest(a)["state"], latest(b)["state"]
    for part in ("unet", "ema"):
        for k, v in sa[part].items():
            assert torch.equal(v, sb[part][k]), (part, k)


def test_errors_before_any_work(stage1, tmp_path):
    root, _ = stage1
    with pytest.raises(ConfigError, match="ldm_train.vqgan_ckpt is empty"):
        train_ldm(smoke_config(root, tmp_path / "r"), progress=False)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        train_ldm(smoke_config(root, tmp_path / "r", f"ldm_train.vqgan_ckpt={tmp_path}/none.pt"), progress=False)
    run = train_ldm(cfg_for(stage1, tmp_path / "x", "ldm_train.epochs=1"), progress=False)
    with pytest.raises(CheckpointError, match="is a 'ldm' checkpoint, expected 'vqgan'"):
        train_ldm(smoke_config(root, tmp_path / "r", f"ldm_train.vqgan_ckpt={run}/checkpoints/best.pt"),
                       progress=False)
    # a UNet that does not fit the VQGAN's latent channels (4 here: in 8 = [x_t ; condition], out >= 4)
    for sets in (("unet.in_channels=16",), ("unet.out_channels=2",)):
        with pytest.raises(ConfigError, match="unet.in_channels must be 8"):
            train_ldm(cfg_for(stage1, tmp_path / "r", *sets), progress=False)
    assert not (tmp_path / "r").exists()


def test_eval_native_size_and_seeded(stage1, tmp_path):
    root, _ = stage1
    run = train_ldm(cfg_for(stage1, tmp_path, "ldm_train.epochs=1"), progress=False)
    ckpt = run / "checkpoints" / "best.pt"
    cfg = suppress.config_for(suppress.build_parser().parse_args(["--ckpt", str(ckpt)]))
    out1, out2, out3 = tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"
    suppress.suppress_images(cfg, ckpt, out_dir=out1, progress=False)
    suppress.suppress_images(cfg, ckpt, out_dir=out2, progress=False)
    cfg.sampler.seed += 1
    summary = suppress.suppress_images(cfg, ckpt, out_dir=out3, progress=False)
    names = (root / "demo_testset.txt").read_text().split()
    assert summary["written"] == len(names)
    for n in names:
        a, b, c = (read_image(o / n).pixels for o in (out1, out2, out3))
        assert a.shape == read_image(root / "CXR" / n).size == (40, 40)    # back at the source size
        np.testing.assert_array_equal(a, b)                                # same seed, same image
    assert any(not np.array_equal(read_image(out1 / n).pixels, read_image(out3 / n).pixels) for n in names)
    timing = json.loads((out1 / "timing.json").read_text())
    assert set(timing["seconds_per_image"]) == {"encode", "sample", "decode", "fusion"}
    # batch-independent: one image at a time gives the same pixels; finished outputs are skipped
    cfg.sampler.seed -= 1
    (out1 / names[0]).unlink()
    again = suppress.suppress_images(cfg, ckpt, out_dir=out1, batch_size=1, progress=False)
    assert (again["written"], again["skipped_existing"]) == (1, len(names) - 1)
    np.testing.assert_array_equal(read_image(out1 / names[0]).pixels, read_image(out2 / names[0]).pixels)


def test_eval_cli_folder_bad_file_and_input_guard(stage1, tmp_path):
    root, _ = stage1
    run = train_ldm(cfg_for(stage1, tmp_path, "ldm_train.epochs=1"), progress=False)
    ckpt = run / "checkpoints" / "best.pt"
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    (folder / "notes.txt").write_text("not an image")
    for n in ("c00.png", "c01.png"):
        (folder / n).write_bytes((root / "CXR" / n).read_bytes())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cmd = [sys.executable, "ldm_eval.py", "--ckpt", str(ckpt), "--input", str(folder), "--no-progress",
           "--sampler", "ddim", "--steps", "3", "--masks", str(root / "Mask")]
    res = subprocess.run(cmd + ["--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    assert "bad.png: not a readable image" in res.stderr and "2 of 3 images written" in res.stdout
    assert "notes.txt: not an image file (ignored)" in res.stderr
    assert json.loads((tmp_path / "out" / "timing.json").read_text())["sampler"]["name"] == "ddim"
    # without masks the global-local path reports every image; --global-only needs none
    res = subprocess.run(cmd[:-2] + ["--out", str(tmp_path / "nomask")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and f"{folder / 'c00.png'}: the global-local path needs lung masks" in res.stderr
    # the built-in segmenter finds no lungs in these smooth test images: each failure names its file
    res = subprocess.run(cmd[:-2] + ["--set", "global_local.masks=auto", "--out", str(tmp_path / "auto")], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 1 and f"ldm_eval.py: {folder / 'c01.png'}: " in res.stderr, res.stderr
    res = subprocess.run(cmd[:-2] + ["--global-only", "--out", str(tmp_path / "g"), "--precision", "bf16"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 1 and "2 of 3 images written" in res.stdout
    assert json.loads((tmp_path / "g" / "timing.json").read_text())["inference"].startswith("precision bf16")
    res = subprocess.run(cmd + ["--out", str(folder)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "the output folder is the input folder" in res.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before          # inputs untouched


@pytest.mark.slow
def test_eval_sharded_over_two_cpu_processes(stage1, tmp_path):
    """torchrun --nproc_per_node 2 ldm_eval.py: each process takes every other image, the outputs are
    those of one process, the summary covers all, and a rerun finds everything done."""
    root, _ = stage1
    run = train_ldm(cfg_for(stage1, tmp_path, "ldm_train.epochs=1"), progress=False)
    ckpt = run / "checkpoints" / "best.pt"
    args = ["ldm_eval.py", "--ckpt", str(ckpt), "--input", str(root / "CXR"), "--masks", str(root / "Mask"),
            "--no-progress", "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=ROOT, capture_output=True,
                         text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    n = len(list((root / "CXR").glob("*.png")))
    assert f"{n} of {n} images written, 0 already done, 0 failed (2 processes)" in two.stdout
    outs = {d: {p.name: p.read_bytes() for p in (tmp_path / d).glob("*.png")} for d in ("one", "two")}
    assert len(outs["one"]) == n and outs["one"] == outs["two"]
    timing = json.loads((tmp_path / "two" / "timing.json").read_text())
    assert timing["processes"] == 2 and timing["written"] == n
    again = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            *args, "--out", str(tmp_path / "two")], cwd=ROOT, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and f"0 of 0 images written, {n} already done" in again.stdout


@pytest.mark.slow
def test_ddp_two_cpu_processes(stage1, tmp_path):
    root, vq = stage1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "ldm_train.py", "--config", "configs/demo.yaml", "configs/smoke.yaml",
                          "--set", f"data.root={root}", "--set", f"run.out_dir={tmp_path}",
                          "--set", f"ldm_train.vqgan_ckpt={vq}", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es)" in res.stdout
    (run,) = (tmp_path / "ldm").iterdir()
    assert latest(run)["step"] == 4          # 9 pairs over 2 ranks, batch 4: 2 iterations per epoch


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_distillation_mode(stage1, tmp_path, prediction):
    from tests.conftest import ROOT
    from utils.config import load_config

    root, vq = stage1
    teacher_run = train_ldm(cfg_for(stage1, tmp_path / "t", "ldm_train.epochs=1",
                                         "diffusion.cond_mode=bug_compatible", f"diffusion.prediction={prediction}"),
                                 progress=False)
    teacher_ckpt = teacher_run / "checkpoints" / "best.pt"
    cfg = load_config([ROOT / "configs" / "demo.yaml", ROOT / "configs" / "smoke.yaml", ROOT / "configs" / "distill.yaml"],
                      [f"data.root={root}", f"run.out_dir={tmp_path / 's'}", f"distill.teacher_ckpt={teacher_ckpt}",
                       "ldm_train.epochs=1", "unet.model_channels=64"])   # the teacher's architecture wins
    given = copy.deepcopy(cfg)
    run = train_ldm(cfg, progress=False)
    assert cfg == given and cfg.ldm_train.vqgan_ckpt == ""              # the caller's config is not changed
    ckpt = latest(run)
    saved = ckpt["config"]
    # config.yaml and the checkpoints state the config the run used: the teacher's sections, resolved
    used = resolve_training_config(cfg)
    teacher_cfg = config_from_dict(load_checkpoint(teacher_ckpt)["config"])
    assert load_config([run / "config.yaml"]) == config_from_dict(saved) == used
    assert used.unet == teacher_cfg.unet and used.ldm_train.vqgan_ckpt == str(vq)
    assert used.diffusion == dataclasses.replace(teacher_cfg.diffusion, cond_mode="scaled_consistent")
    assert resolve_training_config(used) == used                        # resolving again changes nothing
    assert saved["ldm_train"]["mode"] == "distill" and saved["unet"]["model_channels"] == 32
    assert saved["diffusion"]["cond_mode"] == "scaled_consistent"     # bug_compatible teacher, consistent student
    assert saved["diffusion"]["prediction"] == prediction               # the student predicts what the teacher did
    assert saved["ldm_train"]["vqgan_ckpt"] == str(vq)
    teacher = load_checkpoint(teacher_ckpt)["state"]["ema"]
    moved = [k for k, v in ckpt["state"]["unet"].items() if v.dtype.is_floating_point and not torch.equal(v, teacher[k])]
    assert moved                                                        # the student trained away from the teacher
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert all(np.isfinite(float(r["loss"])) for r in rows if r["split"] == "train")
    # ldm_eval takes the distilled checkpoint's sampler: LCM, 4 steps
    ecfg = suppress.config_for(suppress.build_parser().parse_args(["--ckpt", str(run / "checkpoints" / "best.pt")]))
    summary = suppress.suppress_images(ecfg, run / "checkpoints" / "best.pt", out_dir=tmp_path / "o", progress=False)
    assert summary["sampler"]["name"] == "lcm" and summary["sampler"]["steps"] == 4 and summary["written"] > 0
    # a distilled checkpoint is not a teacher; an empty teacher path is a clear error
    with pytest.raises(CheckpointError, match="the teacher must be a diffusion model"):
        cfg.distill.teacher_ckpt = str(run / "checkpoints" / "best.pt")
        train_ldm(cfg, progress=False)
    with pytest.raises(ConfigError, match="distill.teacher_ckpt is empty"):
        cfg.distill.teacher_ckpt = ""
        train_ldm(cfg, progress=False)


def test_eval_dicom_and_16bit_native_output(stage1, tmp_path, dicom_chest):
    import pydicom

    from data.io import write_png

    root, _ = stage1
    run = train_ldm(cfg_for(stage1, tmp_path, "ldm_train.epochs=1"), progress=False)
    ckpt = run / "checkpoints" / "best.pt"
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "chest.dcm").write_bytes(dicom_chest.read_bytes())
    src16 = read_image(root / "CXR" / "c00.png").pixels
    write_png(folder / "c16.png", src16, bit_depth=16)
    masks = tmp_path / "masks"
    h, w = read_image(dicom_chest).size
    m = np.zeros((h, w), np.uint8)
    m[h // 5: 4 * h // 5, w // 8: 3 * w // 8] = 255
    m[h // 5: 4 * h // 5, 5 * w // 8: 7 * w // 8] = 255
    write_png(masks / "chest.png", m)
    write_png(masks / "c16.png", read_image(root / "Mask" / "c00.png").pixels)
    cfg = suppress.config_for(suppress.build_parser().parse_args(["--ckpt", str(ckpt)]))
    summary = suppress.suppress_images(cfg, ckpt, input_dir=folder, out_dir=tmp_path / "out", masks_dir=masks,
                            save_paths=True, progress=False)
    assert summary["written"] == 2 and not summary["failures"]
    out16 = read_image(tmp_path / "out" / "c16.png")
    assert out16.bit_depth == 16 and out16.size == (40, 40)
    png = read_image(tmp_path / "out" / "chest.png")
    assert png.size == (1955, 1841) and png.bit_depth == 16
    src, out = pydicom.dcmread(dicom_chest), pydicom.dcmread(tmp_path / "out" / "chest.dcm")
    assert (out.Rows, out.Columns, out.BitsStored, out.PhotometricInterpretation) == \
        (src.Rows, src.Columns, src.BitsStored, src.PhotometricInterpretation)
    assert out.PatientID == src.PatientID and out.StudyInstanceUID == src.StudyInstanceUID
    assert out.SOPInstanceUID != src.SOPInstanceUID and out.SeriesInstanceUID != src.SeriesInstanceUID
    assert "bone suppressed" in out.SeriesDescription and "DERIVED" in out.ImageType
    assert out.pixel_array.shape == (1955, 1841)
    for part in ("global", "local", "fused"):
        assert (tmp_path / "out" / "paths" / part / "chest.png").is_file()
    assert (folder / "chest.dcm").read_bytes() == dicom_chest.read_bytes()      # input untouched


def test_inputs_whose_outputs_would_collide_are_refused_before_work(tmp_path):
    from pathlib import Path

    suppress.check_output_names([Path("a/x.png"), Path("a/y.dcm"), Path("a/z.PNG")])
    with pytest.raises(ValueError, match=r"a/x.png and a/x.dcm would both be written as x.png"):
        suppress.check_output_names([Path("a/x.png"), Path("a/x.dcm")])
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"")
    (folder / "x.dcm").write_bytes(b"")
    res = subprocess.run([sys.executable, "ldm_eval.py", "--ckpt", str(tmp_path / "missing.pt"), "--input", str(folder),
                          "--config", "configs/demo.yaml", "configs/smoke.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "would both be written as x.png" in res.stderr   # before the model is loaded


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(stage1, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom after the run folder was made")

    monkeypatch.setattr(stages.train_ldm, "build_unet", boom)
    with pytest.raises(RuntimeError, match="boom"):
        train_ldm(cfg_for(stage1, tmp_path, "ldm_train.epochs=1"), progress=False)
    assert not list((tmp_path / "ldm").iterdir())          # made, then removed: nothing was trained
    unwritable = tmp_path / "a_file"
    unwritable.write_text("")
    with pytest.raises(ValueError, match="cannot write output here"):
        train_ldm(cfg_for(stage1, tmp_path, f"run.out_dir={unwritable}/runs"), progress=False)


def test_eval_overrides_that_cannot_apply_are_errors_and_vqgan_ckpt_applies(stage1, tmp_path):
    root, vq = stage1
    run = train_ldm(cfg_for(stage1, tmp_path, "ldm_train.epochs=1"), progress=False)
    ckpt = str(run / "checkpoints" / "best.pt")
    parse = suppress.build_parser().parse_args
    with pytest.raises(ConfigError, match=r"--set data.image_size=64: data.image_size is fixed by the checkpoint"):
        suppress.config_for(parse(["--ckpt", ckpt, "--set", "data.image_size=64"]))
    with pytest.raises(ConfigError, match="unet.model_channels is fixed"):
        suppress.config_for(parse(["--ckpt", ckpt, "--set", "unet.model_channels=64"]))
    suppress.config_for(parse(["--ckpt", ckpt, "--set", "data.image_size=32"]))     # the trained value: harmless
    # a moved first stage, named at evaluation time, is used; a wrong one is an error naming the key
    moved = tmp_path / "elsewhere.pt"
    moved.write_bytes(Path(vq).read_bytes())
    cfg = suppress.config_for(parse(["--ckpt", ckpt, "--set", f"ldm_train.vqgan_ckpt={moved}"]))
    summary = suppress.suppress_images(cfg, ckpt, out_dir=tmp_path / "out", masks_dir=str(root / "Mask"), progress=False)
    assert summary["written"] > 0
    cfg = suppress.config_for(parse(["--ckpt", ckpt, "--set", "ldm_train.vqgan_ckpt=nope.pt"]))
    with pytest.raises(CheckpointError, match="ldm_train.vqgan_ckpt=nope.pt: file not found"):
        suppress.suppress_images(cfg, ckpt, out_dir=tmp_path / "out2", progress=False)


def test_eval_runs_with_the_model_convention_and_leaves_the_callers_config(stage1, tmp_path):
    """A config from files (not the checkpoint's) with another size and intensity convention: the run
    uses the model's, the caller's object is unchanged, and the summary states the config that ran."""
    root, _ = stage1
    run = train_ldm(cfg_for(stage1, tmp_path, "ldm_train.epochs=1"), progress=False)
    ckpt = run / "checkpoints" / "best.pt"
    given = smoke_config(root, tmp_path, "data.image_size=64", "data.invert=true", "sampler.steps=2")
    before = copy.deepcopy(given)
    summary = suppress.suppress_images(given, ckpt, out_dir=tmp_path / "out", progress=False)
    assert given == before and summary["written"] > 0
    ran = config_from_dict(summary["config"])
    assert (ran.data.image_size, ran.data.invert, ran.sampler.steps) == (32, False, 2)
    assert json.loads((tmp_path / "out" / "timing.json").read_text())["config"] == summary["config"]
    trained = config_from_dict(load_checkpoint(ckpt)["config"])
    assert ran == suppress.resolve_config(given, trained) == suppress.resolve_config(ran, trained)


def test_moved_run_tree_finds_its_first_stage_from_anywhere(stage1, tmp_path, monkeypatch):
    """Runs trained with relative paths, then the whole project folder moved and used from elsewhere."""
    import shutil

    root, vq = stage1
    proj = tmp_path / "proj"
    (proj / "runs" / "vqgan" / "000-smoke" / "checkpoints").mkdir(parents=True)
    shutil.copy(vq, proj / "runs" / "vqgan" / "000-smoke" / "checkpoints" / "best.pt")
    monkeypatch.chdir(proj)
    run = train_ldm(smoke_config(root, Path("runs"), "ldm_train.epochs=1",
                                      "ldm_train.vqgan_ckpt=runs/vqgan/000-smoke/checkpoints/best.pt"), progress=False)
    shutil.move(str(proj), str(tmp_path / "moved"))
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "moved" / run / "checkpoints" / "best.pt"
    cfg = suppress.config_for(suppress.build_parser().parse_args(["--ckpt", str(ckpt)]))
    summary = suppress.suppress_images(cfg, ckpt, out_dir=tmp_path / "out", masks_dir=str(root / "Mask"), progress=False)
    assert summary["written"] > 0 and not summary["failures"]


# ---- round 3, part B: one image's failure stays that image's ----------------------------------------

def _folder_of_images(folder: Path, names, size: int = 40) -> Path:
    """Smooth random 8-bit images under ``names`` (the pixels do not matter here)."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        write_gray(folder / n, rng.integers(0, 256, (size, size), dtype=np.uint8))
    return folder


def _dicom_without_sop_class(path: Path) -> Path:
    """CT_small.dcm with neither SOPClassUID nor the file meta's MediaStorageSOPClassUID."""
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.SOPClassUID
    del ds.file_meta.MediaStorageSOPClassUID
    ds.save_as(path, enforce_file_format=False)
    return path


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A stage-2 checkpoint with random weights (no training), for the tests around the model."""
    base = tmp_path_factory.mktemp("untrained")
    return untrained_ldm(base, base / "no-data")


EVAL_FAST = ["--global-only", "--no-progress", "--steps", "1"]


def test_a_failed_write_fails_that_image_only(untrained, tmp_path):
    """Before: a DICOM without SOPClassUID (AttributeError traceback) or a folder at an output's name
    aborted the run: later images never processed, no timing.json. Now each is that image's failure,
    a symbolic link at an output's name is not taken for a finished output, the summary is written."""
    folder = _folder_of_images(tmp_path / "in", ["a.png", "c.png", "d.png", "e.png"])
    _dicom_without_sop_class(folder / "b.dcm")
    out = tmp_path / "out"
    (out / "c.png").mkdir(parents=True)                             # a folder at an output's name
    (tmp_path / "elsewhere.png").write_bytes(b"not ours")
    (out / "d.png").symlink_to(tmp_path / "elsewhere.png")         # a link at an output's name
    res = subprocess.run([sys.executable, "ldm_eval.py", "--ckpt", str(untrained), "--input", str(folder),
                          "--out", str(out), *EVAL_FAST], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "2 of 5 images written, 0 already done, 3 failed" in res.stdout, res.stdout
    assert f"{out / 'b.dcm'}: derived DICOM not written: the source {folder / 'b.dcm'} has no SOPClassUID" in res.stderr
    assert f"{out / 'c.png'}: the output's name is taken by a folder" in res.stderr
    assert f"{out / 'd.png'}: the output's name is a symbolic link" in res.stderr
    assert all(len(line.strip()) and "\n" not in line for line in res.stderr.splitlines())
    assert (out / "a.png").is_file() and (out / "e.png").is_file() and not (out / "b.png").exists()
    assert (tmp_path / "elsewhere.png").read_bytes() == b"not ours" and (out / "c.png").is_dir()
    timing = json.loads((out / "timing.json").read_text())
    assert timing["written"] == 2 and sorted(f["name"] for f in timing["failures"]) == ["b.dcm", "c.png", "d.png"]


def test_a_full_disk_stops_cleanly_keeping_what_was_written(untrained, tmp_path, monkeypatch):
    """ENOSPC on the third image: the two written stay and are counted, the rest is not processed, the
    summary says why in one line, timing.json is written, the exit status is 3."""
    folder = _folder_of_images(tmp_path / "in", [f"x{i}.png" for i in range(6)])
    fill_disk_after(monkeypatch, 2)
    undo = monkeypatch.undo
    cfg = suppress.config_for(suppress.build_parser().parse_args(["--ckpt", str(untrained), *EVAL_FAST[:1]]))
    summary = suppress.suppress_images(cfg, untrained, input_dir=folder, out_dir=tmp_path / "out", batch_size=1, progress=False)
    assert summary["written"] == 2 and summary["not_processed"] == 3 and len(summary["failures"]) == 1
    assert summary["stopped"] == f"disk full: {tmp_path / 'out' / 'x2.png'}: cannot write (No space left on device)"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["x0.png", "x1.png"]
    assert json.loads((tmp_path / "out" / "timing.json").read_text())["stopped"] == summary["stopped"]
    assert suppress.exit_status(summary, distributed=False) == suppress.exit_status(summary, distributed=True) == 3
    # resumed after freeing space: the two are skipped, the rest written
    undo()
    again = suppress.suppress_images(cfg, untrained, input_dir=folder, out_dir=tmp_path / "out", progress=False)
    assert (again["written"], again["skipped_existing"], again["stopped"]) == (4, 2, None)


def test_eval_output_names_agree_with_their_content(untrained, tmp_path):
    """Before: PNG bytes under t.tif and j.jpg. Now a TIFF input gives a TIFF of its name and bit depth
    (also under paths/), a JPEG input a PNG named j.png."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.arange(40 * 40, dtype=np.uint16).reshape(40, 40) * 40).save(folder / "t.tif")
    Image.fromarray(np.full((40, 40), 120, np.uint8)).save(folder / "j.jpg", quality=95)
    cfg = suppress.config_for(suppress.build_parser().parse_args(["--ckpt", str(untrained), *EVAL_FAST[:1]]))
    summary = suppress.suppress_images(cfg, untrained, input_dir=folder, out_dir=tmp_path / "out", save_paths=True, progress=False)
    assert summary["written"] == 2 and not summary["failures"]
    formats = {p.relative_to(tmp_path / "out").as_posix(): Image.open(p).format
               for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "timing.json"}
    assert formats == {"t.tif": "TIFF", "j.png": "PNG", **{f"paths/{part}/{n}": fmt for part in ("global", "fused")
                                                            for n, fmt in (("t.tif", "TIFF"), ("j.png", "PNG"))}}
    assert read_image(tmp_path / "out" / "t.tif").bit_depth == 16


def test_save_paths_refuses_a_planted_symbolic_link(untrained, tmp_path):
    """Before: a symbolic link planted at out/paths was written through. Now refused before any work."""
    folder = _folder_of_images(tmp_path / "in", ["a.png"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "paths").symlink_to(elsewhere)
    res = subprocess.run([sys.executable, "ldm_eval.py", "--ckpt", str(untrained), "--input", str(folder),
                          "--out", str(tmp_path / "out"), "--save-paths", *EVAL_FAST], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2 and f"{tmp_path / 'out' / 'paths'}: is a symbolic link" in res.stderr, res.stderr
    assert not list(elsewhere.iterdir()) and not (tmp_path / "out" / "a.png").exists()


def test_moved_run_tree_trained_with_absolute_paths_finds_its_first_stage(tmp_path, monkeypatch):
    """Before: a run trained with an absolute ldm_train.vqgan_ckpt, then moved as a whole, could not find
    its first stage (only relative stored paths were searched). Now the stored path's trailing parts
    are tried against every folder above the moved checkpoint."""
    import shutil

    ckpt = untrained_ldm(tmp_path / "old" / "proj", tmp_path / "no-data")
    stored = load_checkpoint(ckpt)["config"]["ldm_train"]["vqgan_ckpt"]
    assert Path(stored).is_absolute() and Path(stored).is_file()
    shutil.move(str(tmp_path / "old"), str(tmp_path / "new"))
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "new" / "proj" / "ldm" / "checkpoints" / "best.pt"
    folder = _folder_of_images(tmp_path / "in", ["a.png"])
    cfg = suppress.config_for(suppress.build_parser().parse_args(["--ckpt", str(moved), *EVAL_FAST[:1]]))
    summary = suppress.suppress_images(cfg, moved, input_dir=folder, out_dir=tmp_path / "out", progress=False)
    assert summary["written"] == 1 and not summary["failures"]
    assert suppress.first_stage(moved, cfg, cfg) == tmp_path / "new" / "proj" / "vqgan" / "best.pt"


def test_eval_writes_a_signed_dicom_back_in_its_representation(untrained, tmp_path):
    """MR_small (int16, VOI window 600/1600) through ldm_eval: the derived DICOM keeps int16, 16 bits
    stored and the window, and its values lie in the window's stored range (read as the viewer sees it)."""
    import pydicom
    from pydicom.data import get_testdata_file

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "mr.dcm").write_bytes(open(get_testdata_file("MR_small.dcm"), "rb").read())
    cfg = suppress.config_for(suppress.build_parser().parse_args(["--ckpt", str(untrained), *EVAL_FAST[:1]]))
    summary = suppress.suppress_images(cfg, untrained, input_dir=folder, out_dir=tmp_path / "out", progress=False)
    assert summary["written"] == 1 and not summary["failures"]
    out, src = pydicom.dcmread(tmp_path / "out" / "mr.dcm"), pydicom.dcmread(folder / "mr.dcm")
    assert (out.PixelRepresentation, out.BitsStored, out.pixel_array.dtype) == (1, 16, np.int16)
    assert (out.WindowCenter, out.WindowWidth) == (src.WindowCenter, src.WindowWidth)
    assert -200 <= out.pixel_array.min() and out.pixel_array.max() <= 1399
    assert read_image(tmp_path / "out" / "mr.png").bit_depth == 16


def test_exit_status_design():
    """1 for a failed image on one process; 0 from every torchrun process (the failures are in the
    final line and timing.json; a non-zero rank makes torchrun print a crash report); 3 when stopped."""
    ok, failed = {"failures": [], "stopped": None}, {"failures": [{"name": "a"}], "stopped": None}
    assert [suppress.exit_status(s, False) for s in (ok, failed)] == [0, 1]
    assert [suppress.exit_status(s, True) for s in (ok, failed)] == [0, 0]
    assert suppress.exit_status({**failed, "stopped": "disk full: x"}, True) == 3


@pytest.mark.slow
def test_torchrun_partial_failure_is_no_crash(untrained, tmp_path):
    """Before: one bad image under torchrun gave a non-zero rank and the launcher's traceback. Now every
    process exits 0, the failure is listed in the summary line and in timing.json."""
    folder = _folder_of_images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "ldm_eval.py", "--ckpt", str(untrained), "--input", str(folder), "--out", str(tmp_path / "out"),
                          *EVAL_FAST], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert res.returncode == 0 and "Traceback" not in res.stderr and "ChildFailedError" not in res.stderr, res.stderr
    assert "3 of 4 images written, 0 already done, 1 failed (2 processes)" in res.stdout
    timing = json.loads((tmp_path / "out" / "timing.json").read_text())
    assert [f["name"] for f in timing["failures"]] == ["bad.png"] and timing["processes"] == 2


def test_blocked_outputs_are_only_this_inputs_own(tmp_path):
    """A folder at x.dcm blocks a DICOM input x.dcm (its derived DICOM), not a PNG input x.png."""
    out = tmp_path / "out"
    (out / "x.dcm").mkdir(parents=True)
    png = _folder_of_images(tmp_path / "in", ["x.png"]) / "x.png"
    assert suppress.blocked_output(out, png, save_paths=False) is None
    (tmp_path / "in2").mkdir()
    dcm = _dicom_without_sop_class(tmp_path / "in2" / "x.dcm")
    assert "taken by a folder" in suppress.blocked_output(out, dcm, save_paths=False)
    assert suppress.blocked_output(out, png, save_paths=True) is None
    (out / "paths" / "fused" / "x.png").mkdir(parents=True)
    assert "paths/fused/x.png" in suppress.blocked_output(out, png, save_paths=True)

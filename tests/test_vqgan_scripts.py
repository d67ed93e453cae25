"""vq-gan_train.py and vq-gan_eval.py end to end on a tiny dataset (CPU)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data.io import read_image
from tests.conftest import ROOT, fill_disk_after, smoke_config, tiny_dataset, untrained_ldm, write_gray
import stages.train_vqgan
from stages import reconstruct
from stages.train_vqgan import train_vqgan
from utils.checkpoint import CheckpointError, load_checkpoint



@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("vq") / "ds")


def model_state(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "latest.json")
                                                                 .read_text())["file"])
    return ckpt


def test_train_writes_run_folder(dataset, tmp_path):
    run = train_vqgan(smoke_config(dataset, tmp_path), progress=False)
    assert run.parent == tmp_path / "vqgan"
    for f in ("config.yaml", "log.txt", "metrics.csv", "curves.png", "samples/val_0002.png",
              "checkpoints/best.pt", "checkpoints/latest.json"):
        assert (run / f).is_file(), f
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert {r["split"] for r in rows} == {"train", "val"}
    assert all(float(r["loss_g"]) > 0 for r in rows if r["split"] == "train")
    ckpt = model_state(run)
    assert ckpt["kind"] == "vqgan" and ckpt["epoch"] == 1 and ckpt["step"] == 10   # 18 images / 4 = 5 it/epoch
    assert set(ckpt["state"]) == {"model", "opt_g", "sched_g", "disc", "opt_d", "sched_d"}
    # milestones in epochs: the LR halves after epoch 1 (iteration 5) for G and for D
    tc = smoke_config(dataset, tmp_path).vq_train
    assert ckpt["state"]["sched_g"]["_last_lr"] == pytest.approx([tc.lr_g * tc.gamma])
    assert ckpt["state"]["sched_d"]["_last_lr"] == pytest.approx([tc.lr_d * tc.gamma])


def test_resume_is_exact(dataset, tmp_path):
    straight = train_vqgan(smoke_config(dataset, tmp_path / "a"), progress=False)
    first = train_vqgan(smoke_config(dataset, tmp_path / "b", "vq_train.epochs=1"), progress=False)
    resumed = train_vqgan(smoke_config(dataset, tmp_path / "b", "vq_train.epochs=2"), resume=first, progress=False)
    assert resumed == first
    a, b = model_state(straight), model_state(resumed)
    assert a["step"] == b["step"] == 10
    for part in ("model", "disc"):
        for k, v in a["state"][part].items():
            assert torch.equal(v, b["state"][part][k]), (part, k)
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r["split"] == "val"] == [5, 10]


def test_resume_refuses_other_architecture(dataset, tmp_path):
    run = train_vqgan(smoke_config(dataset, tmp_path, "vq_train.epochs=1"), progress=False)
    with pytest.raises(CheckpointError, match=r"vqgan.num_embeddings: checkpoint 16 vs config 32"):
        train_vqgan(smoke_config(dataset, tmp_path, "vqgan.num_embeddings=32"), resume=run, progress=False)


def test_missing_perceptual_weights_stop_before_any_work(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*empty_hub"):
        train_vqgan(smoke_config(dataset, tmp_path / "runs", "vq_loss.perceptual_weight=0.001"), progress=False)
    assert not (tmp_path / "runs").exists()


def test_nonfinite_loss_stops_and_keeps_checkpoint(dataset, tmp_path, monkeypatch):
    real = stages.train_vqgan.build_hybrid_loss

    def poisoned(*a, **k):
        loss = real(*a, **k)
        gen = loss.generator_loss

        def generator_loss(x, x_rec, commit, step):
            value, logs = gen(x, x_rec, commit, step)
            return (value * float("nan") if step >= 7 else value), logs

        loss.generator_loss = generator_loss
        return loss

    monkeypatch.setattr(stages.train_vqgan, "build_hybrid_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite generator loss at step 7 .*step_0000005\.pt"):
        train_vqgan(smoke_config(dataset, tmp_path), progress=False)
    run = next((tmp_path / "vqgan").iterdir())
    assert load_checkpoint(run / "checkpoints" / "step_0000005.pt")["step"] == 5
    # on_nonfinite=skip: the poisoned batches (steps 7..) are skipped and counted, the run finishes
    run = train_vqgan(smoke_config(dataset, tmp_path / "skip", "vq_train.on_nonfinite=skip"), progress=False)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert float(rows[-1]["skipped"]) == 3        # steps 7, 8, 9 of epoch 2 poisoned (5 batches per epoch)
    assert model_state(run)["step"] == 7


def test_eval_reconstructs_native_size(dataset, tmp_path, capsys):
    run = train_vqgan(smoke_config(dataset, tmp_path, "vq_train.epochs=1"), progress=False)
    ckpt = run / "checkpoints" / "best.pt"
    cfg = reconstruct.config_for(reconstruct.build_parser().parse_args(["--ckpt", str(ckpt)]))
    summary = reconstruct.reconstruct_images(cfg, ckpt, split="test", progress=False)
    out = run / "eval" / "test"
    rows = list(csv.DictReader(open(out / "recon_metrics.csv")))
    assert len(rows) == summary["scored"] == 2 * len((dataset / "demo_testset.txt").read_text().split())
    src = read_image(dataset / rows[0]["name"])
    assert read_image(out / rows[0]["name"]).size == src.size == (40, 40)       # 40 is not a multiple of f=4
    assert 0 < summary["codebook"]["perplexity"] <= 16 and "codebook: perplexity" in capsys.readouterr().out
    # a folder with a corrupt file: reported, the rest scored, exit status 1
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"nope")
    (folder / "good.png").write_bytes((dataset / "CXR" / "c00.png").read_bytes())
    write_gray(folder / "tiny.png", np.full((1, 1), 90, np.uint8))       # 1x1: too small for SSIM, not fatal
    res = subprocess.run([sys.executable, "vq-gan_eval.py", "--ckpt", str(ckpt), "--input", str(folder),
                          "--out", str(tmp_path / "o"), "--no-progress"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 1 and "bad.png: not a readable image" in res.stderr and "Traceback" not in res.stderr
    assert (tmp_path / "o" / "good.png").is_file() and (tmp_path / "o" / "tiny.png").is_file()
    rows = {r["name"]: r for r in csv.DictReader(open(tmp_path / "o" / "recon_metrics.csv"))}
    assert set(rows) == {"good.png", "tiny.png"} and rows["tiny.png"]["ssim"] in ("nan", "")


@pytest.mark.slow
def test_ddp_two_cpu_processes(dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "vq-gan_train.py", "--config", "configs/demo.yaml", "configs/smoke.yaml",
                          "--set", f"data.root={dataset}", "--set", f"run.out_dir={tmp_path}", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es)" in res.stdout
    runs = list((tmp_path / "vqgan").iterdir())
    assert len(runs) == 1                     # rank 0 made the folder, rank 1 used the same one
    ckpt = model_state(runs[0])
    assert ckpt["step"] == 6                  # 18 images over 2 ranks, batch 4: 3 iterations per epoch


# ---- round 3, part B: outputs never replace what the run did not write; names agree with content ----

@pytest.fixture(scope="module")
def untrained_vqgan(tmp_path_factory):
    """A VQGAN checkpoint with random weights (no training): the pixels do not matter here."""
    base = tmp_path_factory.mktemp("untrained")
    untrained_ldm(base, base / "no-data")
    return base / "vqgan" / "best.pt"


def _eval_cli(ckpt, *args):
    return subprocess.run([sys.executable, "vq-gan_eval.py", "--ckpt", str(ckpt), "--no-progress", *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _tree(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_eval_never_replaces_files_it_did_not_write(untrained_vqgan, tmp_path):
    """Before: --out pointed at the ground-truth BS/ folder replaced every target, exit 0. Now refused
    before any work unless --overwrite; a rerun into its own folder needs --overwrite too."""
    ds = tmp_path / "ds"
    for sub in ("CXR", "BS"):
        for n in ("p0.png", "p1.png"):
            write_gray(ds / sub / n, np.full((20, 24), 100 if sub == "CXR" else 60, np.uint8))
    before = _tree(ds)
    res = _eval_cli(untrained_vqgan, "--input", ds / "CXR", "--out", ds / "BS")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"{ds / 'BS' / 'p0.png'} and 1 more already exist; choose an empty --out or pass --overwrite" in res.stderr
    assert _tree(ds) == before
    out = tmp_path / "recon"
    assert _eval_cli(untrained_vqgan, "--input", ds / "CXR", "--out", out).returncode == 0
    res = _eval_cli(untrained_vqgan, "--input", ds / "CXR", "--out", out)
    assert res.returncode == 2 and "recon_metrics.csv and 3 more already exist" in res.stderr
    assert _eval_cli(untrained_vqgan, "--input", ds / "CXR", "--out", out, "--overwrite").returncode == 0


def test_eval_refuses_the_input_folder_as_output_by_any_path(untrained_vqgan, tmp_path, monkeypatch):
    """Before: --out = --input was not refused up front and the CSV landed in the input folder. Now
    refused before any work, also with --overwrite, through a symbolic link, a '..' path, and for a split whose --out is the data root (out/CXR is CXR/)."""
    folder = tmp_path / "in"
    write_gray(folder / "a.png", np.full((16, 16), 80, np.uint8))
    (tmp_path / "link").symlink_to(folder)
    before = _tree(folder)
    for out in (folder, tmp_path / "link", tmp_path / "in" / ".." / "in"):
        res = _eval_cli(untrained_vqgan, "--input", folder, "--out", out, "--overwrite")
        assert res.returncode == 2 and "the output folder is the input folder" in res.stderr, res.stderr
    assert _tree(folder) == before and not (folder / "recon_metrics.csv").exists()
    for sub in ("CXR", "BS"):
        write_gray(tmp_path / "ds" / sub / "a.png", np.full((16, 16), 80, np.uint8))
    monkeypatch.setattr(reconstruct, "split_list", lambda data_cfg, split: ["a.png"])
    with pytest.raises(ValueError, match="the output folder is the input folder"):
        reconstruct.reconstruct_images(smoke_config(tmp_path / "ds", tmp_path), untrained_vqgan, split="test",
                                       out_dir=tmp_path / "ds", overwrite=True, progress=False)


def test_eval_output_names_agree_with_their_content(untrained_vqgan, tmp_path):
    """Before: PNG bytes under x.dcm and under x.tif. Now a TIFF input gives a TIFF of its name and bit
    depth, DICOM and JPEG inputs a PNG named <stem>.png; x.png beside x.jpg is refused before work."""
    from PIL import Image
    from pydicom.data import get_testdata_file

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    Image.fromarray(np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 100).save(folder / "t16.tif")
    Image.fromarray(np.full((20, 20), 120, np.uint8)).save(folder / "j.jpg", quality=95)
    res = _eval_cli(untrained_vqgan, "--input", folder, "--out", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    formats = {p.name: Image.open(p).format for p in (tmp_path / "out").iterdir() if not p.name.startswith("recon")}
    assert formats == {"ct.png": "PNG", "t16.tif": "TIFF", "j.png": "PNG"}
    assert read_image(tmp_path / "out" / "t16.tif").bit_depth == 16 and read_image(tmp_path / "out" / "ct.png").bit_depth == 16
    (folder / "j.png").write_bytes((tmp_path / "out" / "j.png").read_bytes())
    res = _eval_cli(untrained_vqgan, "--input", folder, "--out", tmp_path / "out2")
    assert res.returncode == 2 and "would both be written as j.png" in res.stderr


def test_eval_full_disk_stops_cleanly(untrained_vqgan, tmp_path, monkeypatch):
    """ENOSPC on the second image: the first stays, the run stops, the summary says why."""
    folder = tmp_path / "in"
    for i in range(4):
        write_gray(folder / f"x{i}.png", np.full((16, 16), 40 * i, np.uint8))
    fill_disk_after(monkeypatch, 1)
    cfg = reconstruct.config_for(reconstruct.build_parser().parse_args(["--ckpt", str(untrained_vqgan)]))
    summary = reconstruct.reconstruct_images(cfg, untrained_vqgan, input_dir=folder, out_dir=tmp_path / "out", progress=False)
    assert summary["stopped"] == f"disk full: {tmp_path / 'out' / 'x1.png'}: cannot write (No space left on device)"
    assert summary["scored"] == 1 and len(summary["failures"]) == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["x0.png"]

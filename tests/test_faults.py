"""Fault injection: SIGKILL during training, corrupt checkpoints, and resuming after crashes."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, tiny_dataset
from utils.checkpoint import CheckpointManager, load_checkpoint


def train_cmd(root, out, *extra):
    return [sys.executable, "vq-gan_train.py", "--config", "configs/demo.yaml", "configs/smoke.yaml",
            "--set", f"data.root={root}", "--set", f"run.out_dir={out}", "--no-progress", *extra]


def step_files(out) -> set:
    """The step checkpoints written so far under ``out/vqgan/<run>/checkpoints``."""
    return set((out / "vqgan").glob("*/checkpoints/step_*.pt")) if (out / "vqgan").is_dir() else set()


def run_then_kill(cmd, out, env, delay: float | None) -> tuple[bool, int, float]:
    """Start ``cmd``; once it has written a new checkpoint (training is under way, whatever the start-up
    time of this machine), wait ``delay`` seconds and SIGKILL it if still running (None: never).
    Returns (killed, return code, seconds from the new checkpoint to the end)."""
    before = step_files(out)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and step_files(out) <= before:
        time.sleep(0.01)
    t_ckpt = time.perf_counter()
    killed = False
    if delay is not None and proc.poll() is None:
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed = True
    proc.wait()
    return killed, proc.returncode, time.perf_counter() - t_ckpt


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path):
    root = tiny_dataset(tmp_path / "ds", n=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs = "vq_train.epochs=12"
    # the uninterrupted reference run; its pace sets the kill times (one checkpoint per epoch)
    _, rc, after_first = run_then_kill(train_cmd(root, tmp_path / "ref", "--set", epochs), tmp_path / "ref", env, None)
    assert rc == 0
    epoch_s = after_first / 11
    (ref_run,) = (tmp_path / "ref" / "vqgan").iterdir()
    ref = load_checkpoint(CheckpointManager(ref_run).latest())

    rng = random.Random(1234)
    out = tmp_path / "killed"
    run_dir, kills, finished = None, 0, False
    for attempt in range(6):
        cmd = train_cmd(root, out, "--set", epochs) if run_dir is None else \
            [sys.executable, "vq-gan_train.py", "--resume", str(run_dir), "--no-progress"]
        # anywhere in the next 2.5 epochs: mid-step, mid-validation or mid-save
        killed, rc, _ = run_then_kill(cmd, out, env, rng.uniform(0.0, 2.5) * epoch_s)
        kills += killed
        if rc == 0:
            finished = True
            break
        run_dir = run_dir or next((out / "vqgan").iterdir())
        latest = CheckpointManager(run_dir).latest()
        assert latest is not None and load_checkpoint(latest)["step"] > 0   # never a half-written checkpoint
    assert kills >= 1
    if not finished:                                     # finish what is left
        cmd = train_cmd(root, out, "--set", epochs) if run_dir is None else \
            [sys.executable, "vq-gan_train.py", "--resume", str(run_dir), "--no-progress"]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
        run_dir = run_dir or next((out / "vqgan").iterdir())
    final = load_checkpoint(CheckpointManager(run_dir).latest())
    assert final["step"] == ref["step"]
    for k, v in ref["state"]["model"].items():
        assert torch.equal(v, final["state"]["model"][k]), k
    assert len(CheckpointManager(run_dir).step_files()) <= 3      # keep_last


def test_corrupt_latest_checkpoint_falls_back_or_fails_clearly(tmp_path):
    from stages.train_vqgan import train_vqgan
    from tests.conftest import smoke_config
    from utils.checkpoint import CheckpointError

    root = tiny_dataset(tmp_path / "ds")
    run = train_vqgan(smoke_config(root, tmp_path / "runs"), progress=False)
    newest = CheckpointManager(run).latest()
    newest.write_bytes(newest.read_bytes()[:1000])       # e.g. a disk that filled up outside our control
    with pytest.raises(CheckpointError, match=f"{newest.name}: not a readable checkpoint"):
        train_vqgan(smoke_config(root, tmp_path / "runs", "vq_train.epochs=3"), resume=run, progress=False)

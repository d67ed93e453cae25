"""Fault injection: SIGKILL during training, corrupt checkpoints, and resuming after crashes."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from tests.scripts import tiny_dataset
from utils.checkpoint import CheckpointManager, load_checkpoint


def train_cmd(root, out, *extra):
    return [sys.executable, "vq-gan_train.py", "--config", "configs/demo.yaml", "configs/smoke.yaml",
            "--set", f"data.root={root}", "--set", f"run.out_dir={out}", "--no-progress", *extra]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path):
    root = tiny_dataset(tmp_path / "ds", n=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    epochs = "vq_train.epochs=12"
    # the uninterrupted reference run
    subprocess.run(train_cmd(root, tmp_path / "ref", "--set", epochs), cwd=ROOT, env=env, check=True,
                   capture_output=True)
    (ref_run,) = (tmp_path / "ref" / "vqgan").iterdir()
    ref = load_checkpoint(CheckpointManager(ref_run).latest())

    rng = random.Random(1234)
    out = tmp_path / "killed"
    run_dir, kills, finished = None, 0, False
    for attempt in range(6):
        cmd = train_cmd(root, out, "--set", epochs) if run_dir is None else \
            [sys.executable, "vq-gan_train.py", "--resume", str(run_dir), "--no-progress"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(4.0, 8.0))               # python + torch start-up takes a few seconds
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if proc.returncode == 0:
            finished = True
            break
        if run_dir is None and (out / "vqgan").exists():
            run_dir = next((out / "vqgan").iterdir(), None)
        latest = CheckpointManager(run_dir).latest() if run_dir is not None else None
        if latest is None:                               # killed before the first checkpoint: start over
            if run_dir is not None:
                shutil.rmtree(run_dir)
            run_dir = None
            continue
        assert load_checkpoint(latest)["step"] > 0        # never a half-written checkpoint
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
    from tests.scripts import load_script, smoke_config
    from utils.checkpoint import CheckpointError

    train = load_script("vq-gan_train.py")
    root = tiny_dataset(tmp_path / "ds")
    run = train.main(smoke_config(root, tmp_path / "runs"), progress=False)
    newest = CheckpointManager(run).latest()
    newest.write_bytes(newest.read_bytes()[:1000])       # e.g. a disk that filled up outside our control
    with pytest.raises(CheckpointError, match=f"{newest.name}: not a readable checkpoint"):
        train.main(smoke_config(root, tmp_path / "runs", "vq_train.epochs=3"), resume=run, progress=False)

"""Checkpoints: round trip, safe loading, mismatch errors, pruning; run folders and logs."""
from __future__ import annotations

import json
import pickle
import re

import pytest
import torch

from utils.checkpoint import (CheckpointError, CheckpointManager, load_checkpoint, load_state,
                              require_same_section, save_checkpoint)
from utils.config import Config, config_to_dict
from utils.logging import CSVLogger, make_run_dir, plot_curves, save_grid


def small_state():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return net, opt


def test_round_trip(tmp_path):
    net, opt = small_state()
    save_checkpoint(tmp_path / "c.pt", kind="toy", step=7, epoch=2, config=config_to_dict(Config()),
                    state={"model": net.state_dict(), "opt": opt.state_dict()}, extra={"rng": torch.get_rng_state()})
    ckpt = load_checkpoint(tmp_path / "c.pt", kind="toy")
    assert ckpt["step"] == 7 and ckpt["epoch"] == 2 and ckpt["config"] == config_to_dict(Config())
    net2 = torch.nn.Linear(3, 2)
    load_state(net2, ckpt["state"]["model"], "c.pt", "model")
    x = torch.randn(5, 3)
    assert torch.equal(net(x), net2(x))
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt["state"]["opt"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_lazy_load_maps_the_weights_and_refuses_the_same_files(tmp_path, monkeypatch):
    """lazy=True (a config read) memory-maps the file and gives the same checkpoint; a legacy-format
    file is still read; a truncated file and an unsafe pickle are refused as without it."""
    net, _ = small_state()
    save_checkpoint(tmp_path / "c.pt", kind="toy", step=3, epoch=1, config=config_to_dict(Config()),
                    state={"model": net.state_dict()})
    calls, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("mmap")) or real_load(*a, **k))
    lazy, full = load_checkpoint(tmp_path / "c.pt", lazy=True), load_checkpoint(tmp_path / "c.pt")
    assert calls == [True, False]
    assert lazy["config"] == full["config"] and lazy["step"] == 3
    assert torch.equal(lazy["state"]["model"]["weight"], full["state"]["model"]["weight"])
    legacy = {k: v for k, v in full.items()}
    torch.save(legacy, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert load_checkpoint(tmp_path / "legacy.pt", lazy=True)["config"] == full["config"]
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt", lazy=True)
    torch.save({"format": "x", "payload": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        load_checkpoint(tmp_path / "evil.pt", lazy=True)


class Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("touch EXPLOITED",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": "x", "payload": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "EXPLOITED").exists()
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError, match="evil.pkl"):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not (tmp_path / "EXPLOITED").exists()


def test_whole_model_pickles_and_junk_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pth")   # the reference's torch.save(model)
    with pytest.raises(CheckpointError, match="model.pth: refused"):
        load_checkpoint(tmp_path / "model.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    net, _ = small_state()
    save_checkpoint(tmp_path / "t.pt", kind="toy", step=1, epoch=0, config={}, state={"model": net.state_dict()})
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="is a 'toy' checkpoint, expected 'vqgan'"):
        load_checkpoint(tmp_path / "t.pt", kind="vqgan")


def test_mismatch_messages(tmp_path):
    cfg = config_to_dict(Config())
    other = config_to_dict(Config())
    other["vqgan"]["num_embeddings"] = 256
    ckpt = {"config": other}
    with pytest.raises(CheckpointError, match=r"vqgan.num_embeddings: checkpoint 256 vs config 1024"):
        require_same_section(ckpt, "x.pt", cfg["vqgan"], "vqgan")
    with pytest.raises(CheckpointError, match=r"'model' does not match this architecture: .*of another shape"):
        load_state(torch.nn.Linear(3, 4), torch.nn.Linear(3, 2).state_dict(), "x.pt", "model")
    with pytest.raises(CheckpointError, match="missing"):
        load_state(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)),
                   torch.nn.Sequential(torch.nn.Linear(3, 2)).state_dict(), "x.pt", "model")


def test_manager_keeps_last_and_points_at_latest(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    assert m.latest() is None
    for step in (10, 20, 30):
        m.save(step=step, kind="toy", epoch=0, config={}, state={}, best=(step == 20))
    assert [p.name for p in m.step_files()] == ["step_0000020.pt", "step_0000030.pt"]
    assert m.latest().name == "step_0000030.pt"
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["step"] == 20
    (tmp_path / "checkpoints" / "latest.json").write_text("{broken")
    assert m.latest().name == "step_0000030.pt"
    # A planted pointer out of the folder (a file that exists there) is ignored: --resume stays in the run.
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(b"x")
    for planted in ("../elsewhere.pt", str(elsewhere), 7):
        (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": 1, "file": planted}))
        assert m.latest().name == "step_0000030.pt", planted
    json.loads('{"a": 1}')


def test_run_dir_csv_plot_grid(tmp_path):
    a, b = make_run_dir(tmp_path, "vqgan", "x"), make_run_dir(tmp_path, "vqgan", "x")
    assert (a.name, b.name) == ("000-x", "001-x")
    log = CSVLogger(a / "metrics.csv")
    for s in range(5):
        log.log({"step": s, "loss": 1.0 / (s + 1)})
    log.log({"step": 5, "loss": 0.1, "val_loss": 0.2})
    again = CSVLogger(a / "metrics.csv")
    assert len(again.rows) == 6 and again.rows[-1]["val_loss"] == "0.2"
    again.truncate_after(2)
    assert len(again.rows) == 3
    plot_curves(a / "metrics.csv", a / "curves.png")
    assert (a / "curves.png").stat().st_size > 1000
    save_grid(a / "grid.png", [torch.rand(2, 1, 8, 8) * 2 - 1, torch.zeros(2, 1, 8, 8)])
    from PIL import Image
    assert Image.open(a / "grid.png").size == (16, 16)


@pytest.mark.parametrize("kind,state,extra,needle", [
    ("ldm", {}, {"latent_size": 8}, "no weights under state['unet'] or state['ema']"),
    ("ldm", {"ema": {"w": torch.zeros(1)}}, {}, "extra['latent_size'] is missing"),
    ("vqgan", {"model": {}}, {}, "no weights under state['model']"),
])
def test_header_with_empty_contents_is_refused(tmp_path, kind, state, extra, needle):
    save_checkpoint(tmp_path / "c.pt", kind=kind, step=1, epoch=0, config=config_to_dict(Config()), state=state,
                    extra=extra)
    with pytest.raises(CheckpointError, match=re.escape(f"c.pt: damaged checkpoint: {needle}")):
        load_checkpoint(tmp_path / "c.pt", kind=kind)


def test_scripts_report_a_damaged_checkpoint_without_traceback(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    save_checkpoint(tmp_path / "e.pt", kind="ldm", step=1, epoch=0, config=config_to_dict(Config()), state={},
                    extra={})
    for script in (["ldm_eval.py"], ["-m", "tools.analysis"]):
        res = subprocess.run([sys.executable, *script, "--ckpt", str(tmp_path / "e.pt")], cwd=ROOT,
                             capture_output=True, text=True)
        assert res.returncode == 2 and "damaged checkpoint" in res.stderr and "Traceback" not in res.stderr, \
            (script, res.stderr)
    res = subprocess.run([sys.executable, "ldm_eval.py", "--ckpt", "x.pt", "--batch-size", "0"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "--batch-size: must be >= 1, got 0" in res.stderr


def test_partial_files_of_a_killed_save_are_removed_and_writes_are_synced(tmp_path, monkeypatch):
    import os

    import utils.atomic

    m = CheckpointManager(tmp_path, keep_last=2)
    m.dir.mkdir(parents=True)
    stale = [m.dir / ".best.pt.abc123.tmp", m.dir / ".step_0000010.pt.x.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)                   # what a SIGKILL during torch.save leaves
    synced = []
    real = os.fsync
    monkeypatch.setattr(utils.atomic.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    m.save(step=20, kind="toy", epoch=0, config={}, state={})
    assert not any(p.exists() for p in stale) and (m.dir / "step_0000020.pt").is_file()
    assert len(synced) >= 4                            # checkpoint + folder, latest.json + folder


def test_moved_absolute_first_stage_is_found_by_its_trailing_path(tmp_path):
    """An absolute stored first-stage path whose tree moved: the longest trailing part that exists
    above the checkpoint wins; fewer than three parts never match, nor does the checkpoint itself."""
    from utils.checkpoint import resolve_first_stage

    def touch(p):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        return p

    ldm = touch(tmp_path / "new" / "proj" / "runs" / "ldm" / "001" / "checkpoints" / "best.pt")
    vq = touch(tmp_path / "new" / "proj" / "runs" / "vqgan" / "000" / "checkpoints" / "best.pt")
    touch(tmp_path / "new" / "proj" / "runs" / "ldm" / "000" / "checkpoints" / "best.pt")   # a decoy, shorter match
    stored = "/gone/proj/runs/vqgan/000/checkpoints/best.pt"
    assert resolve_first_stage(ldm, stored) == vq
    with pytest.raises(CheckpointError, match="was not found"):
        resolve_first_stage(ldm, "/gone/elsewhere/checkpoints/best.pt")      # 3 parts, none of them here
    with pytest.raises(CheckpointError, match="was not found"):
        resolve_first_stage(ldm, "/gone/001/checkpoints/best.pt")            # would be the checkpoint itself

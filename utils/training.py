"""Plumbing shared by the trainers: the distributed run around a trainer, run folder, checkpoints
(what they hold, resume, save), LR milestones, NaN guard (their command line: :mod:`utils.cli`)."""
from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from utils.atomic import require_writable
from utils.checkpoint import CheckpointManager, load_checkpoint, load_state, require_same_section
from utils.config import config_to_dict, save_config
from utils.dist import DistInfo, barrier, cleanup_distributed, setup_distributed
from utils.logging import CSVLogger, make_run_dir


_CREATED: list[Path] = []        # run folders made by prepare_run_dir in this process, newest last


def run_training(train: Callable, cfg, resume: str | Path | None, progress: bool) -> Path:
    """``train(cfg, info, resume, progress)`` in this process's share of a (torchrun) run: the process
    group is set up before and torn down after, and a run folder it made is removed if it fails before
    its first checkpoint. Returns what ``train`` returns (the run folder)."""
    info = setup_distributed(cfg.run.device)
    try:
        with remove_run_dir_on_failure():
            return train(cfg, info, resume, progress)
    finally:
        cleanup_distributed()


@contextlib.contextmanager
def remove_run_dir_on_failure():
    """Around a training call: if it fails before its first checkpoint, delete the run folder it made
    (only that one: folders of other runs, and resumed folders, are never touched)."""
    start = len(_CREATED)
    try:
        yield
    except BaseException:
        for run_dir in _CREATED[start:]:
            if run_dir.is_dir() and not any((run_dir / "checkpoints").glob("*.pt")):
                shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        del _CREATED[start:]


def prepare_run_dir(cfg, info: DistInfo, stage: str, resume: str | Path | None) -> Path:
    """``resume`` itself, or a new ``<out_dir>/<stage>/<NNN>-<name>`` made by rank 0 and shared."""
    if resume is not None:
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir}: run folder to resume not found")
    elif info.is_main:
        require_writable(cfg.run.out_dir)
        run_dir = make_run_dir(cfg.run.out_dir, stage, cfg.run.name)
        _CREATED.append(run_dir)
    else:
        run_dir = None
    if info.distributed:
        box = [str(run_dir) if info.is_main else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return run_dir


def resume_checkpoint(ckpts: CheckpointManager, run_dir: Path, stage: str, cfg,
                      frozen_sections: tuple[str, ...]) -> tuple[dict, Path]:
    """The newest checkpoint of ``run_dir``, refused if a ``frozen_sections`` config section changed."""
    path = ckpts.latest()
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to resume from")
    ckpt = load_checkpoint(path, kind=stage)
    current = config_to_dict(cfg)
    for section in frozen_sections:
        require_same_section(ckpt, path, current[section], section)
    return ckpt, path


class RunCheckpoints:
    """The checkpoints of one training run and the files that go with them.

    ``parts`` names what every checkpoint's ``state`` holds, in order: modules (restored with
    :func:`utils.checkpoint.load_state`, which names a mismatching architecture), optimisers and
    schedulers (``load_state_dict``). Each checkpoint also holds the config, epoch, step, the best
    validation value (``extra["best_val"]``) and the CPU RNG state (``extra["rng_cpu"]``), so that a
    resumed run continues exactly as if it had not stopped.
    """

    def __init__(self, run_dir: Path, stage: str, cfg, info: DistInfo, log: logging.Logger, keep_last: int,
                 parts: dict):
        self.manager = CheckpointManager(run_dir, keep_last)
        self.run_dir, self.stage, self.cfg, self.info, self.log, self.parts = run_dir, stage, cfg, info, log, parts

    def begin(self, resume: bool, frozen_sections: tuple[str, ...]) -> tuple[int, int, float, CSVLogger | None]:
        """Restore the newest checkpoint when ``resume`` (refused if a ``frozen_sections`` section of the
        config changed), then write config.yaml and open metrics.csv without the rows logged after that
        checkpoint (they are logged again). Rank 0 writes; the others get no metrics log.

        Returns:
            (first epoch to train, step, best validation value so far, metrics log or None).
        """
        start_epoch, step, best = 0, 0, math.inf
        if resume:
            ckpt, path = resume_checkpoint(self.manager, self.run_dir, self.stage, self.cfg, frozen_sections)
            for name, part in self.parts.items():
                if isinstance(part, torch.nn.Module):
                    load_state(part, ckpt["state"][name], path, name)
                else:
                    part.load_state_dict(ckpt["state"][name])
            start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
            best = ckpt["extra"].get("best_val", math.inf)
            torch.set_rng_state(ckpt["extra"]["rng_cpu"])
            self.log.info(f"resumed from {path} (epoch {ckpt['epoch']}, step {step})")
        metrics_log = None
        if self.info.is_main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            metrics_log = CSVLogger(self.run_dir / "metrics.csv")
            metrics_log.truncate_after(step)   # rows logged after the checkpoint are re-logged
        return start_epoch, step, best, metrics_log

    def save(self, *, epoch: int, step: int, best: float, is_best: bool, extra: dict | None = None) -> None:
        """Write ``step_NNNNNNN.pt`` (and ``best.pt`` when ``is_best``) on rank 0; every rank waits for it."""
        if self.info.is_main:
            state = {name: part.state_dict() for name, part in self.parts.items()}
            path = self.manager.save(step=step, best=is_best, kind=self.stage, epoch=epoch,
                                     config=config_to_dict(self.cfg), state=state,
                                     extra={"best_val": best, "rng_cpu": torch.get_rng_state(), **(extra or {})})
            self.log.info(f"checkpoint {path}" + (" (best)" if is_best else ""))
        barrier(self.info)


def iteration_milestones(milestones_epochs: list[int], steps_per_epoch: int) -> list[int]:
    """Milestones given in epochs -> iterations, for schedulers stepped once per iteration (§7.10)."""
    return [m * steps_per_epoch for m in milestones_epochs]


def check_finite(loss: torch.Tensor, what: str, step: int, epoch: int, ckpts: CheckpointManager,
                 info: DistInfo, policy: str = "stop") -> bool:
    """True if the loss is finite on every rank. Otherwise ``policy="skip"`` returns False (the caller
    skips the batch and counts it) and ``"stop"`` raises FloatingPointError naming the last good
    checkpoint. All ranks take the same decision."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if info.distributed:
        dist.all_reduce(bad)
    if bad.item() == 0:
        return True
    if policy == "skip":
        return False
    latest = ckpts.latest()
    raise FloatingPointError(f"non-finite {what} loss at step {step} (epoch {epoch + 1}); stopping. "
                             f"Last good checkpoint: {latest or 'none yet'}")

"""Plumbing shared by the training scripts: run folder, resume, LR milestones, NaN guard."""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from utils.atomic import require_writable
from utils.checkpoint import CheckpointManager, load_checkpoint, require_same_section
from utils.config import ConfigError, add_config_args, config_from_args, config_to_dict, load_config
from utils.dist import DistInfo
from utils.logging import make_run_dir


_CREATED: list[Path] = []        # run folders made by prepare_run_dir in this process, newest last


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


# ----------------------------------------------------------------------------------- command lines

def training_parser(description: str) -> argparse.ArgumentParser:
    """The trainers' shared command line: --config, --set, --resume, --no-progress."""
    parser = argparse.ArgumentParser(description=description)
    add_config_args(parser, default=["configs/demo.yaml"])
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint "
                        "(its config.yaml is used; --set may change non-architectural keys)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return parser


def training_config(args, parser):
    """The run's own config.yaml with --set for --resume, else --config files with --set."""
    if args.resume:
        if args.config != parser.get_default("config"):
            raise ConfigError("--resume uses the run's own config.yaml; give changes with --set")
        return load_config([Path(args.resume) / "config.yaml"], args.overrides)
    return config_from_args(args)


def run_training_cli(main, parser) -> None:
    """Parse, build the config, train; known failures become one ``error:`` line and exit status 2."""
    args = parser.parse_args()
    try:
        main(training_config(args, parser), resume=args.resume, progress=args.progress)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the newest complete checkpoint is kept; continue with --resume RUN_FOLDER",
              file=sys.stderr)
        sys.exit(130)
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(
                s in str(err) for s in ("iostream", "PytorchStreamWriter", "No space left", "file write failed")):
            raise                      # not a write failure: a bug, keep its traceback
        print(f"error: writing failed ({' '.join(str(err).split())[:300]}); the newest complete checkpoint is "
              "kept (writes are atomic); free space or fix the location, then --resume RUN_FOLDER", file=sys.stderr)
        sys.exit(2)

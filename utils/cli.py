"""The command lines' shared parts: parsers of the stage scripts, and one way to turn a known failure
into one ``error:`` line and exit status 2 (:func:`entry_point`).

Every error this project raises for bad input is a ``ValueError`` (``ConfigError``,
``CheckpointError``, ``ImageError``, ``CTError`` ...), a ``FileNotFoundError`` or a ``FileExistsError``;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from utils.config import ConfigError, add_config_args, config_from_args, load_config

# What a user can fix (bad arguments, files, configs); the scripts report these in one line.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def entry_point(*extra: type[BaseException]):
    """Decorator of a command line's ``main(argv=None) -> int | None``: a :data:`USER_ERRORS` (or
    ``extra``) failure inside becomes one ``error: <message>`` line on stderr and the return value 2;
    ``None`` becomes 0. The script ends with ``sys.exit(main())``."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                status = main(*args, **kwargs)
            except (*USER_ERRORS, *extra) as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            return 0 if status is None else status
        return run
    return wrap


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def naming_file(path: str | Path, err: Exception) -> str:
    """``err``'s message, prefixed with ``path`` unless it already names it (per-image failure lines)."""
    return str(err) if str(path) in str(err) else f"{path}: {err}"


def eval_parser(description: str, ckpt_help: str, input_help: str) -> argparse.ArgumentParser:
    """The evaluation scripts' shared arguments: --ckpt, --config, --set, --split | --input, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ckpt", required=True, help=ckpt_help)
    parser.add_argument("--config", nargs="+", default=None, metavar="FILE",
                        help="use these configs (data paths, sampler ...) instead of the checkpoint's own")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--split", default="test", choices=["train", "val", "test"])
    group.add_argument("--input", dest="input_dir", help=input_help)
    parser.add_argument("--out", dest="out_dir", help="output folder (default: <run>/eval/<split>)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


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


def run_training_cli(train, parser, argv: list[str] | None = None) -> int:
    """Parse, build the config, ``train(cfg, resume=, progress=)``; returns the exit status: 0, 2 for a
    known failure or a failed write (one ``error:`` line), 130 for an interrupt."""
    args = parser.parse_args(argv)

    @entry_point(FloatingPointError)
    def run() -> None:
        train(training_config(args, parser), resume=args.resume, progress=args.progress)

    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted: the newest complete checkpoint is kept; continue with --resume RUN_FOLDER",
              file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not any(
                s in str(err) for s in ("iostream", "PytorchStreamWriter", "No space left", "file write failed")):
            raise                      # not a write failure: a bug, keep its traceback
        print(f"error: writing failed ({' '.join(str(err).split())[:300]}); the newest complete checkpoint is "
              "kept (writes are atomic); free space or fix the location, then --resume RUN_FOLDER", file=sys.stderr)
        return 2

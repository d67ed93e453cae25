"""Import the top-level scripts whose names are not identifiers (``vq-gan_train.py``)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import ``ROOT/name`` as a module (once; scripts do no work at import) and return it."""
    mod_name = name.replace("-", "_").removesuffix(".py")
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def eval_parser(description: str, ckpt_help: str, input_help: str):
    """The evaluation scripts' shared arguments: --ckpt, --config, --set, --split | --input, --out."""
    import argparse

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


def checkpoint_config(ckpt: str | Path, kind: str, config_files: list | None = None, overrides: list[str] = ()):
    """``config_files`` with ``overrides``, or else the config stored in the checkpoint with them."""
    from utils.checkpoint import load_checkpoint
    from utils.config import config_from_dict, load_config

    if config_files:
        return load_config(config_files, overrides)
    # Only the config is needed: the weights stay on disk (memory-mapped).
    return config_from_dict(load_checkpoint(ckpt, kind=kind, lazy=True)["config"], f"{ckpt} (config)", overrides)


def naming_file(path: str | Path, err: Exception) -> str:
    """``err``'s message, prefixed with ``path`` unless it already names it (per-image failure lines)."""
    return str(err) if str(path) in str(err) else f"{path}: {err}"

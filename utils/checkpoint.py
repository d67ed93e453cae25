"""Checkpoints: dicts of state dicts with the config and step, written atomically, loaded safely.

Layout of a checkpoint file (``torch.save`` of plain containers and tensors only)::

    {"format": FORMAT, "kind": "vqgan" | "ldm" | ..., "step": int, "epoch": int,
     "config": config_to_dict(cfg), "state": {"model": sd, "opt": sd, ...}, "extra": {...}}

Loading always uses ``torch.load(weights_only=True)``: a file that needs arbitrary unpickling (a
whole pickled model, or a file crafted to run code) is refused before anything in it runs.
:class:`CheckpointManager` keeps ``checkpoints/step_NNNNNNN.pt`` files, the last N of them, a
``latest.json`` pointer and an optional ``best.pt``, so a crash at any moment loses at most one
checkpoint interval and never the last good checkpoint.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from utils.atomic import atomic_write, atomic_write_text

FORMAT = "bone-suppression-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and the reason."""


def save_checkpoint(path: str | Path, *, kind: str, step: int, epoch: int, config: dict,
                    state: dict[str, dict], extra: dict | None = None) -> None:
    """Write a checkpoint atomically (temporary file + rename)."""
    payload = {"format": FORMAT, "kind": kind, "step": int(step), "epoch": int(epoch), "config": config,
               "state": state, "extra": extra or {}}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, kind: str | None = None, *, lazy: bool = False) -> dict:
    """Load a checkpoint on the CPU with ``weights_only=True`` (a ``.pt`` file), or a release
    ``.safetensors`` file (:mod:`utils.release`), into the same dict.

    ``lazy``: a ``.pt`` file's tensors are memory-mapped, read from disk only when touched, for a
    caller that needs the config (a paper-size checkpoint holds gigabytes of weights).

    Raises:
        CheckpointError: missing, unreadable, unsafe (needs unpickling of objects), not a checkpoint of
            this project, or of another ``kind``.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    if p.suffix == ".safetensors":
        ckpt = load_safetensors(p)
    else:
        ckpt = _load_pt(p, lazy)
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(f"{p}: is a '{ckpt.get('kind')}' checkpoint, expected '{kind}'")
    return check_contents(ckpt, p)


def _load_pt(p: Path, lazy: bool = False) -> dict:
    """A ``.pt`` checkpoint with this project's header, read with ``weights_only=True`` (``lazy``:
    memory-mapped, for the zip format every checkpoint of this project has; others are read whole)."""
    try:
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=lazy)
        except RuntimeError as e:
            if not lazy or "mmap" not in str(e):
                raise
            ckpt = torch.load(p, map_location="cpu", weights_only=True)     # legacy format: no mmap
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the global it refused; anything else is corruption.
        found = re.search(r"(?:unsupported GLOBAL|Unsupported global:)\s*(?:GLOBAL\s*)?([\w.]+)", str(e))
        if found or "allowlist" in str(e):
            what = found.group(1) if found else "a Python class"
            raise CheckpointError(f"{p}: refused, the file holds pickled Python objects ({what}), not only "
                                  "tensors; only state-dict checkpoints are loaded (weights_only=True)") from None
        raise CheckpointError(f"{p}: not a readable checkpoint (corrupt pickle data)") from None
    except Exception as e:  # truncated zip, not a torch file, permission
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a checkpoint of this project (no '{FORMAT}' header); "
                              "whole pickled models from the reference code are not loaded")
    return ckpt


def _header_json(path: Path, header: dict, key: str, default: str) -> object:
    """One JSON field of a safetensors header; hostile text is a CheckpointError naming file and key.

    The header is 100 MB at most (safetensors' limit), enough for a nesting far deeper than Python's
    recursion limit, so RecursionError is caught as well as malformed JSON; NaN and Infinity, which
    this project never writes, are refused."""

    def no_constant(c: str):
        raise ValueError(f"{c} is not JSON")

    try:
        return json.loads(header.get(key, default), parse_constant=no_constant)
    except RecursionError:
        raise CheckpointError(f"{path}: damaged header: '{key}' is nested too deeply") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged header: '{key}' is not JSON ({_short(e)})") from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 160 else text[:157] + "..."


def load_safetensors(path: Path) -> dict:
    """The checkpoint dict of a release file (:mod:`utils.release`). Raises CheckpointError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: a safetensors file without this project's header (format "
                              f"'{FORMAT}'); export releases with convert_reference.py --export")
    if "config" not in header:
        raise CheckpointError(f"{path}: damaged header: no 'config'")
    config = _header_json(path, header, "config", "{}")
    extra = _header_json(path, header, "extra", "{}")
    aliases = _header_json(path, header, "aliases", "{}")
    for key, value in (("config", config), ("extra", extra), ("aliases", aliases)):
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: damaged header: '{key}' is a {type(value).__name__}, not a mapping")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{path}: damaged header: 'aliases' must map slot names to slot names")
    try:
        step, epoch = int(header.get("step", 0)), int(header.get("epoch", 0))
    except ValueError:
        raise CheckpointError(f"{path}: damaged header: 'step' and 'epoch' must be integers") from None
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        slot, _, key = name.partition(".")
        state.setdefault(slot, {})[key] = t
    for alias, slot in aliases.items():
        if slot not in state:
            raise CheckpointError(f"{path}: header names slot {_short(slot)!r} for {_short(alias)!r}, which the file "
                                  "does not hold")
        state[alias] = state[slot]
    return {"format": FORMAT, "kind": header.get("kind"), "step": step, "epoch": epoch, "config": config,
            "state": state, "extra": extra}


# What each kind of checkpoint must hold for the loaders: state slots (any one of them) and extra keys.
REQUIRED = {"vqgan": (("model",), ()), "ldm": (("unet", "ema"), ("latent_size",))}


def check_contents(ckpt: dict, path: Path) -> dict:
    """Refuse a checkpoint with this project's header whose config, state or extra is missing or
    empty, naming the key (instead of a KeyError deep inside a script)."""
    for key in ("config", "state", "extra"):
        if not isinstance(ckpt.get(key), dict):
            raise CheckpointError(f"{path}: damaged checkpoint: '{key}' is missing or not a mapping")
    slots, extra = REQUIRED.get(ckpt.get("kind"), ((), ()))
    if slots and not any(isinstance(ckpt["state"].get(s), dict) and ckpt["state"][s] for s in slots):
        where = " or ".join(f"state['{s}']" for s in slots)
        raise CheckpointError(f"{path}: damaged checkpoint: no weights under {where}")
    missing = [k for k in extra if k not in ckpt["extra"]]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint: extra['{missing[0]}'] is missing")
    if ckpt.get("kind") in REQUIRED and not ckpt["config"]:
        raise CheckpointError(f"{path}: damaged checkpoint: its config is empty")
    return ckpt


def resolve_first_stage(ckpt_path: str | Path, vqgan_ckpt: str) -> Path:
    """Where a stage-2 checkpoint's first stage is: ``vqgan_ckpt`` as stored in its config.

    A relative path is tried first against the checkpoint's own folder (a converted or released
    model names its ``vqgan.pt`` / ``vqgan.safetensors`` beside it, so the folder can move), then
    against the working directory (training runs store the path they were given), then against each
    folder above the checkpoint (so ``runs/vqgan/...`` is found when the whole ``runs/`` tree moved or
    the command runs from elsewhere). An absolute path is tried as it is, then, if the tree it was in
    has moved, by its trailing components against each folder above the checkpoint
    (:func:`moved_candidates`).

    Raises:
        CheckpointError: the config names no first stage, or the file is in neither place.
    """
    if not vqgan_ckpt:
        raise CheckpointError(f"{ckpt_path}: its config has no ldm_train.vqgan_ckpt (the first stage)")
    stored = Path(vqgan_ckpt)
    here = Path(ckpt_path).resolve().parent
    if stored.is_absolute():
        candidates = [stored, *moved_candidates(stored, here)]
    else:
        candidates = [here / stored, stored, *(a / stored for a in here.parents)]
    found = next((c for c in candidates if c.is_file() and not _same_file(c, ckpt_path)), None)
    if found is None:
        raise CheckpointError(f"{ckpt_path}: its first stage {vqgan_ckpt} was not found beside it, from the working "
                              "directory or from any folder above it; give --set ldm_train.vqgan_ckpt=FILE")
    return found


# The fewest trailing components of a moved absolute path that may identify it: the run folder, its
# checkpoints/ folder and the file (``000-szch/checkpoints/best.pt``); a bare ``checkpoints/best.pt``
# would name the stage-2 checkpoint itself or another run's.
MOVED_MIN_PARTS = 3


def moved_candidates(stored: Path, here: Path) -> list[Path]:
    """Where an absolute first-stage path may be after its tree moved: each trailing part of it, the
    longest first, against ``here`` (the checkpoint's folder) and every folder above it, nearest first.

    ``/old/proj/runs/vqgan/000/checkpoints/best.pt`` stored by a run now under ``/new/proj/runs/ldm/...``
    is found as ``/new/proj`` + ``runs/vqgan/000/checkpoints/best.pt``. Longest first, so that the most
    specific match wins; never fewer than :data:`MOVED_MIN_PARTS` components.
    """
    parts = stored.parts[1:]                       # without the root
    shortest = min(MOVED_MIN_PARTS, len(parts))
    return [folder / Path(*parts[i:]) for i in range(len(parts) - shortest + 1) for folder in (here, *here.parents)]


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).samefile(b)
    except OSError:
        return False


def config_mismatch(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts (or sections of them)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_mismatch(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r} vs config {b!r}")
    return diffs


def require_same_section(ckpt: dict, path: str | Path, current: dict, section: str) -> None:
    """Refuse a checkpoint whose ``config[section]`` (e.g. the architecture) differs from ``current``."""
    diffs = config_mismatch(ckpt["config"].get(section, {}), current, f"{section}.")
    if diffs:
        raise CheckpointError(f"{path}: built with another {section} config: " + "; ".join(diffs))


def load_state(module: torch.nn.Module, state: dict, path: str | Path, name: str) -> None:
    """``load_state_dict(strict=True)`` with one readable error instead of a wall of keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
        raise CheckpointError(f"{path}: '{name}' does not match this architecture: " + ", ".join(parts))
    module.load_state_dict(state)


class CheckpointManager:
    """Step-numbered checkpoints in ``run_dir/checkpoints`` with ``latest.json`` and pruning."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.dir / f"step_{step:07d}.pt"

    def save(self, *, step: int, best: bool = False, **kwargs: Any) -> Path:
        """Write ``step_NNNNNNN.pt`` (and ``best.pt``), then point ``latest.json`` at it, then prune."""
        path = self.path_for(step)
        self.remove_partial_files()
        save_checkpoint(path, step=step, **kwargs)
        if best:
            save_checkpoint(self.dir / "best.pt", step=step, **kwargs)
        # The pointer moves only after the file is complete, so it never names a partial file.
        atomic_write_text(self.dir / "latest.json", json.dumps({"step": step, "file": path.name}, allow_nan=False) + "\n")
        for old in self.step_files()[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def remove_partial_files(self) -> list[Path]:
        """Delete the hidden temporary files (``.best.pt.XXXX.tmp`` ...) that a killed save left behind;
        only the saving process writes here, so none of them can still be in use."""
        stale = [p for p in self.dir.glob(".*.tmp") if p.is_file()] if self.dir.is_dir() else []
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    def step_files(self) -> list[Path]:
        files = [p for p in self.dir.glob("step_*.pt") if re.fullmatch(r"step_\d{7}\.pt", p.name)]
        return sorted(files)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None. Falls back to the file list if latest.json is bad."""
        pointer = self.dir / "latest.json"
        try:
            name = json.loads(pointer.read_text())["file"]
            # Only a step file of this folder: a planted pointer may not send --resume elsewhere.
            if re.fullmatch(r"step_\d{7}\.pt", name) and (self.dir / name).is_file():
                return self.dir / name
        except (OSError, ValueError, KeyError, TypeError):
            pass
        files = self.step_files()
        return files[-1] if files else None

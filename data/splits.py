"""Seeded, reproducible train/val/test splits and their list files (docs/method.md §1.3).

The reference shuffled the sorted file names with an unseeded ``random.shuffle``, so its splits
cannot be reproduced. Here the same procedure runs with ``random.Random(seed)``: the same names,
ratios and seed always give the same lists. Counts follow GL-LCM: train and val take ``int()``
of their share, test takes the remainder (818 pairs -> 654 / 81 / 83).
"""
from __future__ import annotations

import random
from pathlib import Path, PurePosixPath, PureWindowsPath

from data.io import is_image_file
from utils.atomic import atomic_write_text

SPLITS = ("train", "val", "test")


def split_names(names: list[str], ratios: list[float] | tuple[float, ...] = (0.8, 0.1, 0.1),
                seed: int = 42) -> dict[str, list[str]]:
    """Shuffle sorted ``names`` with ``seed`` and cut them into train / val / test.

    Returns:
        {"train": [...], "val": [...], "test": [...]}, each list in shuffled order.
    """
    if len(ratios) != 3:
        raise ValueError(f"split ratios must be three numbers (train, val, test), got {list(ratios)}")
    if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise ValueError(f"split ratios must be non-negative and sum to 1, got {list(ratios)}")
    if len(set(names)) != len(names):
        raise ValueError("duplicate names in the split input")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n = len(order)
    n_train, n_val = int(ratios[0] * n), int(ratios[1] * n)
    return {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}


def list_paths(list_dir: str | Path, prefix: str) -> dict[str, Path]:
    """GL-LCM's file names: ``<prefix>_trainset.txt``, ``<prefix>_valset.txt``, ``<prefix>_testset.txt``."""
    return {s: Path(list_dir) / f"{prefix}_{s}set.txt" for s in SPLITS}


def write_split(split: dict[str, list[str]], list_dir: str | Path, prefix: str, force: bool = False) -> dict[str, Path]:
    """Write the three list files (one name per line, atomically).

    Raises:
        FileExistsError: a list file exists and ``force`` is False (nothing is written then).
    """
    paths = list_paths(list_dir, prefix)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise FileExistsError(f"split lists already exist: {', '.join(existing)} (use --force to overwrite)")
    for s, p in paths.items():
        atomic_write_text(p, "".join(f"{name}\n" for name in split[s]))
    return paths


class ListError(ValueError):
    """A list file cannot be used as it is; the message names the file and the line."""


def read_list(path: str | Path, allow_outside: bool = False) -> list[str]:
    """Names in a list file, one per line (blank lines and '#' comments ignored, a UTF-8 BOM dropped).

    A name is a path relative to the data folders: an absolute name or one with a ``..`` component would
    read (and a report would embed) a file outside the data root, so it is refused unless
    ``allow_outside``.

    Raises:
        FileNotFoundError / ListError (a ValueError): missing or unreadable file, a name listed twice (also
        as its stem: ``a`` and ``a.png`` are one case), a name leaving the data root; the message names the
        file and the line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: split list not found (run dataSegmentation.py first)")
    try:
        # utf-8-sig: editors on Windows start the file with U+FEFF, which would glue onto the first name.
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ListError(f"{p}: cannot read the list ({e})") from None
    names: list[str] = []
    line_of: dict[str, int] = {}          # each name as written, and each image name's stem
    for i, line in enumerate(lines, 1):
        n = line.split("#", 1)[0].strip()
        if not n:
            continue
        if not allow_outside:
            _check_inside(p, i, n)
        # Names may omit the image extension (evaluation.pairing finds the file by stem): "a" and "a.png"
        # are one case; "a.png" and "a.tif" are two files.
        if is_image_file(n):
            stem = str(PurePosixPath(n).with_suffix(""))
            earlier = line_of.get(n) or line_of.get(stem)                 # the same name, or its bare stem
        else:
            stem = None
            earlier = line_of.get(n) or line_of.get(f"stem:{n}")          # an image name with this stem
        if earlier:
            raise ListError(f"{p}: line {i}: {_show(n)} is listed twice (first on line {earlier})")
        line_of[n] = i
        if stem is not None:
            line_of[f"stem:{stem}"] = i
        names.append(n)
    return names


def _check_inside(p: Path, line: int, name: str) -> None:
    """Refuse a name that leaves the folder it is joined to (absolute, a drive, a ``..`` component, NUL)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if "\0" in name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor or ".." in parts:
        raise ListError(f"{p}: line {line}: {_show(name)} leaves the data folder (absolute or '..'); names are "
                        "relative to the data root (metrics.py --allow-outside-root reads such a list)")


def _show(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


def read_split(list_dir: str | Path, prefix: str) -> dict[str, list[str]]:
    """Read all three lists and check that they are disjoint."""
    split = {s: read_list(p) for s, p in list_paths(list_dir, prefix).items()}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            common = set(split[a]) & set(split[b])
            if common:
                raise ValueError(f"{list_dir}: {len(common)} names are in both the {a} and {b} lists, "
                                 f"e.g. {sorted(common)[0]}")
    return split

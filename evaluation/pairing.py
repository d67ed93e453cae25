"""Pairing the files of one case across folders (CXR, target, prediction, mask) by name or stem."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from data.io import ImageError, is_image_file, list_images, read_image


class ImageFolder:
    """Finds a case's file in one folder: by exact name, else by stem among the image files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.by_stem: dict[str, list[str]] = {}
        unusable: list[tuple[Path, str]] = []
        for p in list_images(self.root, must_exist=True, problems=unusable):
            self.by_stem.setdefault(p.stem, []).append(p.name)
        # A broken link or a folder named like an image stays a case, so that it is reported as
        # unreadable instead of vanishing from the listing (hidden files are skipped, as everywhere).
        for p, _ in unusable:
            if is_image_file(p):
                self.by_stem.setdefault(p.stem, []).append(p.name)
        for files in self.by_stem.values():
            files.sort()

    def find(self, name: str) -> tuple[Path | None, str]:
        """(path, "") or (None, why not)."""
        exact = self.root / name
        if exact.is_file():
            return exact, ""
        hits = self.by_stem.get(Path(name).stem if is_image_file(name) else name, [])
        if len(hits) == 1:
            return self.root / hits[0], ""
        if hits:
            return None, f"ambiguous, several files match in {self.root}: {', '.join(hits)}"
        return None, f"not found in {self.root}"

    def names(self) -> list[str]:
        """Every image name of the folder, sorted."""
        return sorted(f for files in self.by_stem.values() for f in files)


def _fmt_size(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def load_case(name: str, folders: dict[str, ImageFolder]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read every image of one case; return (arrays by role, problems)."""
    arrays, problems = {}, []
    for role, folder in folders.items():
        path, why = folder.find(name)
        if path is None:
            problems.append(f"missing {role} ({why})")
            continue
        try:
            arrays[role] = read_image(path).pixels
        except ImageError as e:
            problems.append(f"unreadable {role}: {e}")
    images = {r: a.shape for r, a in arrays.items() if r != "mask"}
    if not problems and len(set(images.values())) > 1:
        problems.append("size mismatch: " + ", ".join(f"{r} {_fmt_size(s)}" for r, s in images.items()))
    return arrays, problems

"""Atomic file writes: write to a temporary file in the target folder, then ``os.replace``.

A crash or SIGKILL in the middle of a write leaves either the old file or the new one, never a
truncated mix, because ``os.replace`` is atomic within one filesystem; the file and then its folder
are fsync'ed, so that a power cut cannot leave the new name pointing at unwritten data.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


class OverwriteInputError(FileExistsError):
    """The output path is one of the inputs it was computed from."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], *inputs: str | os.PathLike) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path``.

    Args:
        path: destination; its folder is created if needed.
        write: writes the complete file to the temporary path it is given.
        inputs: files the output must never replace (the inputs it was computed from).
    Raises:
        OverwriteInputError: ``path`` is one of ``inputs`` (nothing is written).
    """
    dst = Path(path)
    for src in inputs:
        if src and dst.exists() and Path(src).exists() and os.path.samefile(src, dst):
            raise OverwriteInputError(f"{dst}: refusing to overwrite an input file with an output")
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the usual permissions (0666 minus the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp)                      # the data reach the disk before the name points at them,
        os.replace(tmp, dst)
        _fsync(dst.parent)               # and the rename itself survives a power cut
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class UnwritableError(ValueError):
    """An output folder cannot be created or written to; the message names it."""


def require_writable(folder: str | os.PathLike) -> Path:
    """Check, before any work and without creating anything, that files can be written in ``folder``:
    an existing folder by writing a temporary file there, a missing one by its nearest existing
    parent, which must be a folder it can be made in.

    Raises:
        UnwritableError: read-only, under a file, ...; the message names the folder.
    """
    d = Path(folder)
    base = d
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is not a folder")
        if base == d:
            fd, tmp = tempfile.mkstemp(prefix=".write-test.", dir=d)
            os.close(fd)
            os.unlink(tmp)
        elif not os.access(base, os.W_OK | os.X_OK):
            raise PermissionError(f"{base} is not writable")
    except OSError as e:
        raise UnwritableError(f"{d}: cannot write output here ({e.strerror or e})") from None
    return d


def refuse_input_folders(outputs: list[str | os.PathLike], inputs: list[str | os.PathLike]) -> None:
    """Refuse, before any work, an output folder that is one of the input folders, by any path to it
    (``a/../a``, a symbolic link, a bind mount): outputs would be written among, or over, the inputs.

    Raises:
        ValueError: naming the output folder and the input folder it is.
    """
    for out in outputs:
        for src in inputs:
            if _same_folder(out, src):
                raise ValueError(f"{out}: the output folder is the input folder {src}; choose another --out")


def _same_folder(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one folder: the same file on disk when both exist, else the same
    resolved path (a folder that does not exist yet is no input folder)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's) data to the disk; a filesystem that cannot is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def json_nulls(x: Any) -> Any:
    """``x`` with every non-finite float (NaN, ±Inf) replaced by None, through dicts and lists.

    JSON has no NaN or Infinity; undefined figures (no answers, a flat spectrum's slope, the SNR at
    ᾱ = 1) are written as null so the file stays valid JSON for every reader.
    """
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_nulls(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_nulls(v) for v in x]
    return x


def json_text(x: Any, **kwargs: Any) -> str:
    """``json.dumps`` for every JSON file this project writes: non-finite floats become null
    (:func:`json_nulls`) and ``allow_nan=False`` guarantees that no NaN or Infinity, which are not
    JSON, ever reaches a file (a reader in another language rejects the whole file)."""
    import json

    return json.dumps(json_nulls(x), allow_nan=False, **kwargs)

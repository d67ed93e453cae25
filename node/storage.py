"""The node's state on disk, in one storage folder (the queue survives a crash or a restart).

Layout (every name is ``<key>.<ext>``, where ``key`` is the SHA-256 of the SOP Instance UID in hex:
nothing from the received file ever becomes part of a path, so no UID or name can lead outside the
folder)::

    STORAGE/received/<key>.dcm   a film as received (written and fsync'ed before the C-STORE is acknowledged)
    STORAGE/derived/<key>.dcm    its derived soft-tissue instance (written atomically; processed)
    STORAGE/sent/<key>.json      delivered: the derived instance's UIDs and the times (the film is done)
    STORAGE/failed/<key>.json    could not be processed or was refused by the destination, with the reason

A film's state is the furthest of these that exists: sent or failed (done, never processed again),
derived (to send), received (to process). Every file is written through ``utils.atomic`` (a
temporary name in the same folder, fsync, rename), so a kill at any moment leaves each file
whole or absent; leftover temporary files are removed when the node starts. Once a film is
delivered its received and derived copies are deleted unless ``keep`` (the marker stays: the same
instance sent again is acknowledged and not processed twice).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

from utils.atomic import atomic_write, atomic_write_text, json_text

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
FOLDERS = ("received", "derived", "sent", "failed")


def instance_key(sop_instance_uid: str) -> str:
    """The file key of a SOP Instance UID: its SHA-256 in hex (64 characters of [0-9a-f])."""
    return hashlib.sha256(str(sop_instance_uid).strip().strip("\0").encode("utf-8", "surrogateescape")).hexdigest()


class StorageError(ValueError):
    """The storage folder cannot be used; the message names it."""


class Storage:
    """The files of one node under ``root`` (created if needed)."""

    def __init__(self, root: str | os.PathLike, keep: bool = False):
        self.root = Path(root).resolve()
        self.keep = keep
        try:
            for name in FOLDERS:
                (self.root / name).mkdir(parents=True, exist_ok=True)
                if (self.root / name).is_symlink():
                    raise StorageError(f"{self.root / name}: is a symbolic link; the node writes only inside "
                                       "its storage folder")
        except OSError as e:
            raise StorageError(f"{self.root}: cannot use as the node's storage folder ({e.strerror or e})") from None
        self.clean_temporaries()

    # ---------------------------------------------------------------------------------- paths
    def path(self, folder: str, key: str) -> Path:
        """``root/folder/<key>.<ext>``; refuses anything but a known folder and a hex key."""
        if folder not in FOLDERS or not KEY_RE.match(key):
            raise StorageError(f"{folder}/{key!r}: not a storage name")
        return self.root / folder / f"{key}.{'json' if folder in ('sent', 'failed') else 'dcm'}"

    def keys(self, folder: str) -> list[str]:
        """The keys present in ``folder``, oldest first (by modification time, then key)."""
        found = []
        for p in (self.root / folder).iterdir():
            key, _, ext = p.name.partition(".")
            if KEY_RE.match(key) and p.suffix in (".dcm", ".json") and p.is_file() and not p.is_symlink():
                try:
                    found.append((p.stat().st_mtime, key))
                except OSError:
                    continue
        return [k for _, k in sorted(found)]

    def clean_temporaries(self) -> int:
        """Remove the temporary files a killed write left (``.<name>.<random>.tmp``); returns their number."""
        n = 0
        for name in FOLDERS:
            for p in (self.root / name).glob(".*.tmp"):
                try:
                    p.unlink()
                    n += 1
                except OSError:
                    pass
        return n

    # ---------------------------------------------------------------------------------- states
    def state(self, key: str) -> str | None:
        """``sent``, ``failed``, ``derived``, ``received`` or None (unknown instance)."""
        for folder in ("sent", "failed", "derived", "received"):
            if self.path(folder, key).is_file():
                return folder
        return None

    def to_process(self) -> list[str]:
        """Received films not yet processed (nor done), oldest first."""
        done = set(self.keys("sent")) | set(self.keys("failed")) | set(self.keys("derived"))
        return [k for k in self.keys("received") if k not in done]

    def to_send(self) -> list[str]:
        """Derived instances not yet delivered (nor given up), oldest first."""
        done = set(self.keys("sent")) | set(self.keys("failed"))
        return [k for k in self.keys("derived") if k not in done]

    def counts(self) -> dict:
        return {"to_process": len(self.to_process()), "to_send": len(self.to_send()),
                "sent": len(self.keys("sent")), "failed": len(self.keys("failed"))}

    # ---------------------------------------------------------------------------------- writes
    def receive(self, key: str, data: bytes, check: Callable[[str], None] | None = None) -> Path:
        """Store a received film (``data``: the file's bytes) as ``received/<key>.dcm``, atomically and
        durably; ``check(tmp_path)`` runs on the written temporary file before it takes the name and
        may raise to refuse it (nothing is left behind)."""
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)
            if check is not None:
                check(tmp)

        dst = self.path("received", key)
        atomic_write(dst, write)
        return dst

    def mark(self, folder: str, key: str, record: dict) -> None:
        """Write the ``sent`` or ``failed`` marker of ``key``; a delivered film's copies then go (unless keep)."""
        if folder not in ("sent", "failed"):
            raise StorageError(f"{folder}: not a marker folder")
        record = {**record, "time": time.time()}
        atomic_write_text(self.path(folder, key), json_text(record, indent=1) + "\n")
        if folder == "sent" and not self.keep:
            self.drop_copies(key)

    def drop_copies(self, key: str) -> None:
        for folder in ("received", "derived"):
            try:
                self.path(folder, key).unlink()
            except FileNotFoundError:
                pass

    def record(self, folder: str, key: str) -> dict:
        """A marker's content ({} if unreadable)."""
        try:
            value = json.loads(self.path(folder, key).read_text(encoding="utf-8"))
            return value if isinstance(value, dict) else {}
        except (OSError, ValueError):
            return {}

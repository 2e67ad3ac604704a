"""Atomic file writes: write to a temporary name in the same directory, flush, fsync, rename.

A reader (or a resumed run after `kill -9`) sees either the previous complete file or the new complete
file, never a half-written one, because rename within one directory is atomic on POSIX.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`: fsynced and renamed onto `path` on success, removed on any error."""
    path = Path(path)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp_path.touch(0o666, exist_ok=False)  # a fresh name, with the usual permissions (the umask applies)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")

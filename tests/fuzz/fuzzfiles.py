"""File helpers shared by the fuzz tests (imported after putting this folder on ``sys.path``,
as pytest's ``--import-mode=importlib`` does not)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_digest(path: Path) -> str:
    """sha256 of a file's size and data extents (a write may leave a huge sparse file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(str(size).encode())
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(str(start).encode())
            while start < end:
                chunk = os.pread(fd, min(end - start, 1 << 20), start)
                if not chunk:
                    break
                h.update(chunk)
                start += len(chunk)
            pos = end
    return h.hexdigest()

"""Write a file whole or not at all: a temporary file beside it, then one rename.

Why: a plot or a trace interrupted half-way (Ctrl-C, a full disk) must not
leave a truncated file where a reader expects a complete one. Results records
have their own writer (results.save, which also syncs the directory); plots
and timelines share this one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["write_atomically"]


def write_atomically(path: Path, write_to: Callable[[BinaryIO], None]) -> Path:
    """Create ``path``'s directory, write through ``write_to(binary file)`` beside it, move it in place.

    The file is readable by all (0644), as any file a user shares or commits;
    an OSError creating the directory or the temporary file propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            write_to(out)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make a shared file private
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

"""Checks of the paths a command will write, made before any work: one message per problem."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def unwritable_dir(flag: str, directory: Path) -> str | None:
    """Why ``flag`` cannot create files in ``directory`` (missing, no permission, or a file system that takes no
    files such as /proc), or None. A file is created there and removed: permission bits alone say yes to root."""
    if not directory.is_dir():
        return f"{flag}: directory does not exist: {directory}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"{flag}: cannot write in {directory} (permission denied)"
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".dia_fast-write-check-"):
            pass
    except OSError as exc:
        return f"{flag}: cannot write in {directory} ({exc.strerror or exc})"
    return None


def unwritable_file(flag: str, path: Path, example: str) -> str | None:
    """Why ``flag`` cannot write the file ``path`` (a directory, or its directory :func:`unwritable_dir`),
    or None. ``example``: a file name suggested inside the directory the user gave by mistake."""
    if path.is_dir():
        return f"{flag} is a directory: {path} (give a file name, e.g. {path / example})"
    return unwritable_dir(flag, path.resolve().parent)

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


def real_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded and every link resolved (it need not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def overwrites_input(flag: str, out: str | Path, inputs: dict[str, str | Path | None]) -> str | None:
    """Why writing the file ``out`` would overwrite one of ``inputs`` (``{flag: path}``; a missing or None path is
    skipped), or None: ``out`` is that input file, or lies anywhere inside that input directory (a checkpoint)."""
    target = real_path(out)
    for source, path in inputs.items():
        if not path or not Path(path).expanduser().exists():
            continue
        src = real_path(path)
        if target == src:
            return f"{flag} {target} would overwrite the {source} input: give another file"
        if src.is_dir() and src in target.parents:
            return f"{flag} {target} is inside the {source} input {src}: give a file outside it"
    return None

"""argparse for the command-line programs: a usage mistake is one line, ``PROGRAM: error: MESSAGE``, and exit 2
(argparse's own error prints the whole usage block first)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors print ``{error_prefix}: error: {message} (see --help)`` on one line and exit
    with status 2, as the programs' own checks do."""

    def __init__(self, *args: object, error_prefix: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.error_prefix = error_prefix

    def error(self, message: str) -> NoReturn:
        print(f"{self.error_prefix}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> set[str]:
    """The options (dests) that the command line ``argv`` gives, whether or not at their default values (``args``:
    what ``parser`` made of it)."""
    unset = object()  # argparse leaves an attribute that is already there when its option is not given
    again = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return {dest for dest, value in vars(again).items() if value is not unset}


def warning_line(program: str, message: Warning | str, filename: str | None = None, lineno: int | None = None) -> str:
    """A Python warning as the programs show it: ``{program}: warning: MESSAGE``, with where it came from when
    that is outside dia_fast (a dependency's own warning, e.g. a ``SyntaxWarning`` of its source, is then not
    taken for one of dia_fast's)."""
    line = f"{program}: warning: {message}"
    if filename:
        path = Path(filename)
        package = Path(__file__).resolve().parent
        try:
            inside = path.resolve().is_relative_to(package)
        except OSError:
            inside = False
        if not inside:
            line += f" (from {path.parent.name}/{path.name}:{lineno})" if lineno else f" (from {path.name})"
    return line

"""Progress bars (tqdm) for long work: on by default only when stderr is a terminal."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, enabled: bool | None, *, desc: str, unit: str, leave: bool = True) -> Any:
    """A tqdm bar over ``total`` ``unit``s, or None when ``enabled`` is False (None: when stderr is a TTY)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)

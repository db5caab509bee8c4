"""The bench's results: speed-ups between engines, the printed table and the JSON document."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..quantize import QUANT_MODES
from .runners import RunResult

BASELINES = ("transformers", "transformers-bf16", "transformers-compile", "dia_fast-eager")


def add_speedups(results: list[RunResult]) -> None:
    """Set each dia_fast row's speed-up over every baseline measured at the same batch size:
    ratio of decode steps/s (``speedup``) and of total generate time (``speedup_end_to_end``)."""
    by_key = {(r.engine, r.batch): r for r in results}
    for r in results:
        if not r.engine.startswith("dia_fast"):
            continue
        # a quantized engine (dia_fast-MODE, or dia_fast-MODE-KERNEL with several --cuda-int8 kernels) is also
        # compared with the full-precision one
        quantized = r.engine.removeprefix("dia_fast-").split("-")[0] in QUANT_MODES
        for base in BASELINES + (("dia_fast",) if quantized else ()):
            b = by_key.get((base, r.batch))
            if b is None or b is r:
                continue
            r.speedup[base] = r.decode_steps_per_s / max(b.decode_steps_per_s, 1e-12)
            r.speedup_end_to_end[base] = b.total_s / max(r.total_s, 1e-12)


def percentile(values: Sequence[float], q: int) -> float | None:
    """The ``q``-th percentile (1 to 99) of ``values``, interpolated between the measured values (``statistics``'
    "inclusive" method: the default "exclusive" one extrapolates beyond the largest value when there are few);
    None when there are no values."""
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.1f}"


def table(results: list[RunResult]) -> str:
    """A plain-text table, one row per engine and batch size."""
    head = [
        "engine",
        "batch",
        "steps",
        "steps/s",
        "tokens/s",
        "x realtime",
        "TTFA ms",
        "prefill ms",
        "warm-up s",
        "peak mem",
        "speed-up",
    ]
    rows = [head]
    for r in results:
        speed = ", ".join(f"{v:.2f}x vs {k}" for k, v in r.speedup.items()) or "-"
        rows.append(
            [
                r.engine,
                str(r.batch),
                str(r.steps),
                f"{r.decode_steps_per_s:.1f}",
                f"{r.audio_tokens_per_s:.0f}",
                f"{r.realtime_factor:.2f}",
                _ms(r.time_to_first_audio_s),
                _ms(r.prefill_s),
                f"{r.warmup_s:.2f}",
                _fmt_bytes(r.peak_memory_bytes),
                speed,
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def document(meta: dict[str, Any], results: list[RunResult]) -> dict[str, Any]:
    """The JSON document: ``meta`` (device, versions, backends, settings) and ``results``."""
    return {"meta": meta, "results": [r.as_dict() for r in results]}


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (inf, -inf, NaN) replaced by None, in nested dicts, lists and tuples:
    JSON has no such numbers (docs/bench.md says what each null means)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_json(path: str | Path, doc: Any, indent: int = 2) -> Path:
    """Write ``doc`` as strict JSON (non-finite numbers as null) to ``path``, used as given (the command lines
    expand ``~`` when they parse it). The file is replaced at once: an interrupted write leaves the old one."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(finite(doc), indent=indent, default=str, allow_nan=False) + "\n"
    real = Path(os.path.realpath(out))  # a link is written through, not replaced
    tmp = real.with_name(f".{real.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, real)
    finally:
        tmp.unlink(missing_ok=True)
    return out

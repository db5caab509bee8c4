"""Memory while loading a checkpoint, per quantization mode (``--quantize``'s ``loading`` block).

Each mode loads in a fresh Python process (``python -m dia_fast.bench.loading``), so that no memory freed by an
earlier measurement is reused and hidden. The process first loads a throwaway tiny checkpoint the same way (same
device and mode), so that the modules a first load imports (torch's lazily imported parts: ~900 modules, ~145 MiB
on CPU) and its one-time set-up are in place before the baseline; it then notes its memory, loads the checkpoint
with ``DiaTTS.from_pretrained(path, quantize=mode)`` and reports

* ``peak_bytes``: the most memory it held while loading, above what it held before (CPU: peak resident set,
  VmHWM; CUDA: ``torch.cuda.max_memory_allocated``);
* ``after_bytes``: what it holds once loaded, above the same baseline (CPU: resident set; CUDA: allocated);
* ``weight_bytes``: the bytes of the loaded model's tensors (parameters and buffers, int8 weights included);
* ``load_s``: the wall time of ``from_pretrained``.

The codec is a small random demo codec in every mode (its memory is the same for all of them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["measure_loading"]


def _first_load(dev: Any, codec: Any, quantize: str | None) -> None:
    """Load a throwaway tiny checkpoint as the measured load will (its imports and one-time set-up); a mode that
    the tiny model cannot take is left to the measured load to report."""
    from ..api import DiaTTS

    with tempfile.TemporaryDirectory(prefix="dia_fast_loading_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "holds random weights"
        for mode in dict.fromkeys((quantize, None)):
            try:
                tiny = DiaTTS.random("tiny", seed=0, device="cpu", codec=codec)
                path = tiny.save_pretrained(Path(tmp) / "tiny", save_codec=False)
                DiaTTS.from_pretrained(path, device=dev, codec=codec, quantize=mode)
                return
            except Exception:  # noqa: BLE001 - a throwaway: the measured load reports its own errors
                continue


def _load_once(path: str, mode: str, device: str) -> dict[str, Any]:
    import torch

    from ..api import DiaTTS
    from ..codec import load_codec
    from .measure import PeakMemory, weight_bytes

    dev = torch.device(device)
    codec = load_codec(None, device=dev, warn_demo=False)
    quantize = None if mode == "none" else mode
    _first_load(dev, codec, quantize)
    t0 = time.perf_counter()
    with PeakMemory(dev) as mem:
        tts = DiaTTS.from_pretrained(path, device=dev, codec=codec, quantize=quantize)
    return {
        "mode": mode,
        "peak_bytes": mem.peak_bytes,
        "after_bytes": mem.after_bytes,
        "weight_bytes": weight_bytes(tts.model),
        "load_s": time.perf_counter() - t0,
        "memory_kind": mem.kind,
    }


def measure_loading(path: str | Path, modes: list[str], device: str, timeout_s: float = 900) -> dict[str, Any]:
    """``{mode: {peak_bytes, after_bytes, weight_bytes, load_s, memory_kind}}`` for each mode (``"none"``: full
    precision), each loaded in its own process; a mode that fails reports ``{"error": ...}``."""
    out: dict[str, Any] = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for mode in modes:
        cmd = [sys.executable, "-m", "dia_fast.bench.loading", str(path), "--mode", mode, "--device", device]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired:
            out[mode] = {"error": f"loading took more than {timeout_s:.0f} s"}
            continue
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
            out[mode] = {"error": f"exit {r.returncode}: {tail}"}
            continue
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dia_fast.bench.loading", description=__doc__.splitlines()[0])
    p.add_argument("path", help="checkpoint directory or file")
    p.add_argument("--mode", default="none", help="none, int8, fp8 or int4")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    print(json.dumps(_load_once(a.path, a.mode, a.device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

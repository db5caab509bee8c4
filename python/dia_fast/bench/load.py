"""``python -m dia_fast.bench --load``: many concurrent requests (mixed lengths, distinct seeds, optionally
Poisson arrivals) through continuous batching, static batches and one at a time, in one process.

- ``continuous-stream``: :class:`~dia_fast.serving.BatchEngine`; one client thread submits each request at its
  arrival time and one thread per request streams it, decoding its chunks (time to first audio = its first
  chunk).
- ``continuous``: the same, but each thread waits for its whole result and decodes it at once (as static and
  sequential do: less codec work than a stream's overlapping chunks; time to first audio = the finish).
- ``static``: requests grouped in arrival order into batches of up to ``max_slots``, each batch one
  ``DiaTTS.generate`` call that runs until its longest item is done (how batching worked before the engine;
  with distinct seeds the old pool did not batch at all, so this is its best case).
- ``sequential``: one ``DiaTTS.generate`` call per request, in arrival order.

Every request's length is fixed (``min_new_tokens`` = the longest it may be), so every mode produces the same
frames and the comparison is one of scheduling. Throughput = all requests' frames / (last finish - first
arrival); latency = finish - arrival; p50/p95 over the requests (interpolated between measured values: never
above the largest).
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .report import percentile

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = ["LoadRequest", "load_requests", "run_load"]

MODES = ("continuous-stream", "continuous", "static", "sequential")


@dataclass(frozen=True)
class LoadRequest:
    text: str
    max_new_tokens: int
    seed: int
    arrival_s: float  # after the start of the run


def load_requests(
    tts: DiaTTS, n: int, *, arrival_rate: float | None, min_tokens: int, max_tokens: int, seed: int = 0
) -> list[LoadRequest]:
    """``n`` requests: texts and lengths drawn (seeded) from the bench's texts and ``[min_tokens, max_tokens]``;
    arrivals all at 0 or, with ``arrival_rate`` (requests per second), a Poisson process."""
    from . import TEXTS

    gen = torch.Generator().manual_seed(seed)
    lo = max(min_tokens, tts.config.data.max_delay + 2)
    t, out = 0.0, []
    for i in range(n):
        tokens = int(torch.randint(lo, max(lo, max_tokens) + 1, (1,), generator=gen))
        if arrival_rate:
            t += float(torch.empty(1).exponential_(arrival_rate, generator=gen))
        out.append(LoadRequest(TEXTS[i % len(TEXTS)], tokens, 1000 + i, t if arrival_rate else 0.0))
    return out


def _frames(req: LoadRequest, max_delay: int) -> int:
    return req.max_new_tokens - max_delay - 1


def _summary(name: str, reqs: list[LoadRequest], finish: list[float], first: list[float], frames: int) -> dict:
    latency = [f - r.arrival_s for r, f in zip(reqs, finish, strict=True)]
    ttfa = [f - r.arrival_s for r, f in zip(reqs, first, strict=True)]
    wall = max(finish) - min(r.arrival_s for r in reqs)
    return {
        "mode": name,
        "requests": len(reqs),
        "frames": frames,
        "wall_s": wall,
        "frames_per_s": frames / max(wall, 1e-9),
        "latency_p50_s": statistics.median(latency),
        "latency_p95_s": percentile(latency, 95),
        "ttfa_p50_s": statistics.median(ttfa),
        "ttfa_p95_s": percentile(ttfa, 95),
    }


def _wait_until(t0: float, at: float) -> None:
    delay = t0 + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _continuous(tts: DiaTTS, reqs: list[LoadRequest], max_slots: int, sampling: dict, stream: bool) -> dict:
    from ..serving import BatchEngine

    md = tts.config.data.max_delay
    finish = [0.0] * len(reqs)
    first = [0.0] * len(reqs)
    with BatchEngine(tts, max_slots=max_slots, max_queue=max(64, len(reqs))) as engine:
        # warm-up of every bucket (CUDA graphs are captured when the engine starts; kernels compile and CPU graphs
        # record on a bucket's first step): requests of staggered lengths, so the running batch passes through
        # every power of two up to max_slots as they end
        # (lengths staggered per bucket, not per request: a few distinct lengths whatever max_slots is; the requests
        # in the high slots end first, so the batch shrinks through max_slots, max_slots / 2, ..., 1)
        bits = (engine.max_slots - 1).bit_length()
        lengths = [md + 2 + 2 * engine.poll_every * (bits - k.bit_length()) for k in range(engine.max_slots)]
        warm = [
            engine.submit(reqs[0].text, max_new_tokens=n, min_new_tokens=n - md - 1, seed=i, **sampling)
            for i, n in enumerate(lengths)
        ]
        for handle in warm:
            handle.result()
        steps0, batched0 = engine.stats["steps"], engine.stats["batched_steps"]
        handles: list[Any] = [None] * len(reqs)
        submitted = [threading.Event() for _ in reqs]

        errors: list[BaseException] = []

        def consume(i: int) -> None:
            submitted[i].wait()
            if handles[i] is None:  # the client failed before submitting it
                return
            try:
                if stream:
                    for _ in handles[i]:  # the stream's chunks, decoded here as they become final
                        if not first[i]:
                            first[i] = time.perf_counter() - t0
                else:
                    handles[i].result()  # codes, then the whole audio decoded here
            except BaseException as exc:  # noqa: BLE001 - reported by the client below
                errors.append(exc)
            finish[i] = time.perf_counter() - t0
            if not stream:
                first[i] = finish[i]

        # one consumer thread per request, started before the clock; one client (this thread) submits each
        # request at its arrival time, as a server's front end would
        threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(reqs))]
        for th in threads:
            th.start()
        t0 = time.perf_counter()
        try:
            for i in sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s):
                r = reqs[i]
                _wait_until(t0, r.arrival_s)
                handles[i] = engine.submit(
                    r.text, max_new_tokens=r.max_new_tokens, min_new_tokens=_frames(r, md), seed=r.seed,
                    stream=stream, **sampling,
                )  # fmt: skip
                submitted[i].set()
        finally:
            for event in submitted:
                event.set()
            for th in threads:
                th.join()
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(reqs)} load requests failed") from errors[0]
        steps, batched = engine.stats["steps"] - steps0, engine.stats["batched_steps"] - batched0
        # after the clock: each request's own times in the engine (its codes are kept, nothing is decoded again)
        parts = [h.results(decode_audio=False) for h in handles]
    name = "continuous-stream" if stream else "continuous"
    res = _summary(name, reqs, finish, first, sum(_frames(r, md) for r in reqs))
    prefill = [sum(p.stats["prefill_s"] for p in ps) for ps in parts]  # (a long text's pieces: each admitted)
    queued = [ps[0].stats["queued_s"] for ps in parts]
    res.update(
        decode_steps=steps,
        batched_steps=batched,
        max_slots=max_slots,
        admission_s_total=sum(prefill),  # the scheduler admits one request at a time: no step runs meanwhile
        admission_s_p50=statistics.median(prefill),
        queued_s_p50=statistics.median(queued),
        queued_s_p95=percentile(queued, 95),
    )
    return res


def _batches(tts: DiaTTS, reqs: list[LoadRequest], size: int, sampling: dict, name: str) -> dict:
    md = tts.config.data.max_delay
    finish = [0.0] * len(reqs)
    order = sorted(range(len(reqs)), key=lambda i: reqs[i].arrival_s)
    # warm-up of every batch size the groups have (on CUDA each bucket captures its graph on first use, and
    # Triton compiles per batch shape: none of that inside the timed window)
    for n in sorted({len(order[lo : lo + size]) for lo in range(0, len(order), size)}):
        tts.generate([reqs[0].text] * n, max_new_tokens=md + 2, progress=False, **sampling)
    t0 = time.perf_counter()
    for lo in range(0, len(order), size):
        group = order[lo : lo + size]
        _wait_until(t0, max(reqs[i].arrival_s for i in group))  # a static batch starts when it is full
        longest = max(reqs[i].max_new_tokens for i in group)
        tts.generate(
            [reqs[i].text for i in group],
            max_new_tokens=longest,
            min_new_tokens=longest - md - 1,
            seed=reqs[group[0]].seed,
            progress=False,
            **sampling,
        )
        done = time.perf_counter() - t0
        for i in group:
            finish[i] = done
    return _summary(name, reqs, finish, finish, sum(_frames(r, md) for r in reqs))


def run_load(
    tts: DiaTTS,
    *,
    requests: int = 16,
    max_slots: int | None = None,
    arrival_rate: float | None = None,
    min_tokens: int = 64,
    max_tokens: int = 192,
    modes: tuple[str, ...] = MODES,
    sampling: dict[str, Any] | None = None,
    seed: int = 0,
    repeat: int = 1,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the load in each of ``modes`` on ``tts`` and return ``{"requests": [...], "results": [...]}``
    (each result: throughput, latency and time-to-first-audio percentiles; ``speedup_vs_sequential``).

    ``repeat``: rounds, each running every mode once (interleaved, so that a change in the machine's load
    hits every mode alike); each mode reports its fastest round and lists every round's ``frames_per_s_runs``.
    ``on_progress``: called after every mode's run with the same dict over the runs so far (``"partial": True``),
    so that a run stopped early keeps what it measured."""
    from ..serving import default_max_slots

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown load modes {bad}; valid: {', '.join(MODES)}")
    if requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if arrival_rate is not None and not 0 < arrival_rate < math.inf:
        raise ValueError(f"arrival_rate must be a finite number > 0 (requests per second) or None, got {arrival_rate}")
    slots = default_max_slots(tts.device) if max_slots is None else max_slots
    reqs = load_requests(
        tts, requests, arrival_rate=arrival_rate, min_tokens=min_tokens, max_tokens=max_tokens, seed=seed
    )
    sampling = dict(sampling or {})
    runs: dict[str, list[dict]] = {m: [] for m in modes}

    def summary() -> dict[str, Any]:
        results = []
        for mode in modes:
            if not runs[mode]:
                continue
            best = dict(max(runs[mode], key=lambda r: r["frames_per_s"]))
            best["frames_per_s_runs"] = [r["frames_per_s"] for r in runs[mode]]
            results.append(best)
        seq = next((r for r in results if r["mode"] == "sequential"), None)
        for r in results:
            if seq is not None:
                r["speedup_vs_sequential"] = r["frames_per_s"] / max(seq["frames_per_s"], 1e-12)
        return {
            "requests": [vars(r) for r in reqs],
            "results": results,
            "max_slots": slots,
            "arrival_rate": arrival_rate,
            "repeat": repeat,
        }

    for round_ in range(repeat):
        for i, mode in enumerate(modes):
            if mode.startswith("continuous"):
                runs[mode].append(_continuous(tts, reqs, slots, sampling, stream=mode == "continuous-stream"))
            elif mode == "static":
                runs[mode].append(_batches(tts, reqs, slots, sampling, "static"))
            else:
                runs[mode].append(_batches(tts, reqs, 1, sampling, "sequential"))
            if on_progress is not None and (round_, i) != (repeat - 1, len(modes) - 1):
                on_progress({**summary(), "partial": True})
    return summary()


def load_table(results: list[dict[str, Any]]) -> str:
    """The load results as a plain-text table."""
    head = ["mode", "requests", "frames/s", "speed-up", "latency p50 s", "latency p95 s", "TTFA p50 s", "TTFA p95 s"]
    rows = [head]
    for r in results:
        rows.append(
            [
                r["mode"],
                str(r["requests"]),
                f"{r['frames_per_s']:.1f}",
                f"{r['speedup_vs_sequential']:.2f}x" if "speedup_vs_sequential" in r else "-",
                f"{r['latency_p50_s']:.2f}",
                f"{r['latency_p95_s']:.2f}",
                f"{r['ttfa_p50_s']:.2f}",
                f"{r['ttfa_p95_s']:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in results:
        if "admission_s_total" in r:
            lines.append(
                f"{r['mode']}: admission {r['admission_s_total']:.3f} s in all ({1e3 * r['admission_s_p50']:.1f} ms "
                f"p50 per request), queued p50 / p95 {r['queued_s_p50']:.2f} / {r['queued_s_p95']:.2f} s, "
                f"{r['decode_steps']} decode steps"
            )
    return "\n".join(lines)

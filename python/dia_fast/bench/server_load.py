"""``python -m dia_fast.bench --server-load``: concurrent HTTP requests against the speech server
(``python -m dia_fast.serve``), as its clients see it: requests/s, time to first byte and latency (p50/p95).

Without ``--url`` a server with the random tiny demo model is started in this process on 127.0.0.1 (a free port);
with ``--url`` an already running server is measured. Each request is ``POST /v1/audio/speech`` with a distinct
seed, sent by one of ``--concurrency`` client threads (httpx); ``--stream`` asks for a streamed ``pcm`` body
(time to first byte = the first audio), otherwise a whole ``wav`` (first byte = the whole answer)."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._version import __version__
from ..cliparse import OneLineParser, given_options
from ..paths import unwritable_file
from .report import percentile, write_json

__all__ = ["main", "run_server_load"]

TEXTS = (
    "[S1] Hello there, how are you today?",
    "[S2] Fine, thanks. And you?",
    "[S1] A slightly longer sentence, to vary the lengths a little (laughs).",
    "[S2] Short one.",
)


@contextlib.contextmanager
def _local_server(max_batch: int | None, max_queue: int) -> Iterator[str]:
    from ..serve import ServerSettings, create_app
    from ..serve.local import serve_in_thread

    with serve_in_thread(create_app(ServerSettings(max_batch=max_batch, max_queue=max_queue))) as local:
        yield local.url


def run_server_load(
    url: str,
    *,
    requests: int = 32,
    concurrency: int = 16,
    stream: bool = True,
    max_new_tokens: int = 120,
    model: str = "tts-1",
    api_key: str | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Send ``requests`` speech requests, ``concurrency`` at a time, to the server at ``url``; returns the summary
    (requests/s, time to first byte and latency percentiles, audio bytes, errors by status, or ``transport: NAME``
    for a request whose connection failed or dropped: an error of that request, not of the run)."""
    import httpx

    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be >= 1")
    url = url.rstrip("/")  # the base URL: paths are appended to it
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def one(i: int, client: httpx.Client) -> dict[str, Any]:
        body = {
            "model": model,
            "voice": "dialogue",
            "input": TEXTS[i % len(TEXTS)],
            "seed": 1000 + i,
            "max_new_tokens": max_new_tokens,
            "response_format": "pcm" if stream else "wav",
        }
        if stream:
            body["stream_format"] = "audio"
        t0 = time.perf_counter()
        first, size = None, 0
        try:
            with client.stream("POST", f"{url}/v1/audio/speech", json=body, headers=headers) as resp:
                for chunk in resp.iter_bytes():
                    if chunk and first is None:
                        first = time.perf_counter() - t0
                    size += len(chunk)
        except (httpx.HTTPError, TimeoutError) as exc:  # the connection failed or dropped: an error of that request
            status: int | str = f"transport: {type(exc).__name__}"
        else:
            status = resp.status_code
        return {"status": status, "ttfb_s": first, "latency_s": time.perf_counter() - t0, "bytes": size}

    local = threading.local()

    def run(i: int) -> dict[str, Any]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=timeout_s)
        return one(i, local.client)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(run, range(requests)))  # (each request is bounded by the client's timeout_s)
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    errors: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    ttfb = sorted(r["ttfb_s"] for r in ok if r["ttfb_s"] is not None)
    lat = sorted(r["latency_s"] for r in ok)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "stream": stream,
        "max_new_tokens": max_new_tokens,
        "ok": len(ok),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "ttfb_p50_s": percentile(ttfb, 50),
        "ttfb_p95_s": percentile(ttfb, 95),
        "latency_p50_s": percentile(lat, 50),
        "latency_p95_s": percentile(lat, 95),
        "audio_bytes": sum(r["bytes"] for r in ok),
    }


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        error_prefix="dia_fast.bench",
        prog="python -m dia_fast.bench --server-load",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--server-load", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--url",
        help="base URL of a running server, e.g. http://127.0.0.1:8000 (default: start one with the tiny "
        "demo model on 127.0.0.1)",
    )
    p.add_argument("--requests", type=int, default=32, help="requests in all (default 32)")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=120, help="decoder steps per request (default 120)")
    p.add_argument("--whole", action="store_true", help="ask for whole WAV answers instead of streamed PCM")
    p.add_argument("--max-batch", type=int, help="local server: engine slots (default: the device's)")
    p.add_argument("--max-queue", type=int, default=64, help="local server: queue length (default 64)")
    p.add_argument("--model", default="tts-1", help="the model field sent (default tts-1)")
    p.add_argument("--api-key", help="Bearer key of the server, if it needs one")
    p.add_argument("--json", dest="json_path", help="write the result here")
    return p


def _max_new_tokens_problem(steps: int, *, local: bool) -> str | None:
    """Why every request with ``steps`` decoder steps would be refused, or None: the local server's tiny demo model
    takes its delay pattern's steps plus one up to its audio length minus one; a server at --url at least Dia's
    delay pattern's (its model's audio length is not known here: the server checks that)."""
    from ..config import DataConfig, DiaConfig
    from . import steps_problem

    if local:
        return steps_problem("--max-new-tokens", steps, DiaConfig.preset("tiny").data)
    low = DataConfig().max_delay + 2
    if steps < low:
        return f"--max-new-tokens must be at least {low} (Dia's delay pattern needs {low - 1} steps), got {steps}"
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked before any work (one-line errors, exit 2); ``url`` without a trailing slash and
    ``json_path`` with ``~`` expanded."""
    p = _parser()
    a = p.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")
    if a.max_batch is not None and (a.max_batch < 1 or a.max_batch & (a.max_batch - 1)):
        p.error(f"--max-batch must be a power of two >= 1, got {a.max_batch}")
    if a.max_queue < 1:
        p.error(f"--max-queue must be >= 1, got {a.max_queue}")
    if problem := _max_new_tokens_problem(a.max_new_tokens, local=a.url is None):
        p.error(problem)
    if a.url is not None:
        given = given_options(p, argv, a)  # given at its default value is an error too
        for flag in ("--max-batch", "--max-queue"):
            if flag[2:].replace("-", "_") in given:
                p.error(f"{flag} applies to the local server only (without --url)")
        a.url = a.url.strip().rstrip("/")
        if not a.url.startswith(("http://", "https://")):
            p.error(f"--url must start with http:// or https://, got {a.url!r}")
    if a.json_path is not None:
        a.json_path = str(Path(a.json_path).expanduser())
        if problem := unwritable_file("--json", Path(a.json_path), "server_load.json"):
            p.error(problem)
    return a


def _health_problem(url: str) -> str | None:
    """Why ``url`` is not the base URL of a dia_fast speech server that takes requests, or None: its ``/health``
    must answer 200, or 503 with status "starting" (the model is loading)."""
    import httpx

    try:
        resp = httpx.get(f"{url}/health", timeout=10)
    except (httpx.HTTPError, ValueError) as exc:
        return f"cannot reach the server at {url}: {type(exc).__name__}: {exc}"
    try:
        body = resp.json()
    except ValueError:
        body = None
    status = body.get("status") if isinstance(body, dict) else None
    if (resp.status_code == 200 and status is not None) or (resp.status_code == 503 and status == "starting"):
        return None
    said = f"status {status!r}" if status is not None else "no dia_fast health status"
    return (
        f"{url} is not a dia_fast speech server ready for requests: GET {url}/health answered "
        f"{resp.status_code} ({said}); give the server's base URL, e.g. http://127.0.0.1:8000"
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    if a.url and (problem := _health_problem(a.url)):  # reachable and answering, before any timing
        print(f"dia_fast.bench: error: {problem}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        url = a.url or stack.enter_context(_local_server(a.max_batch, a.max_queue))
        res = run_server_load(
            url,
            requests=a.requests,
            concurrency=a.concurrency,
            stream=not a.whole,
            max_new_tokens=a.max_new_tokens,
            model=a.model,
            api_key=a.api_key,
        )
    meta = {
        "dia_fast": __version__,
        "server": a.url or "local (tiny demo model, this process)",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"dia_fast {__version__} server load: {res['requests']} requests, {res['concurrency']} at once, "
        f"{'streamed pcm' if res['stream'] else 'whole wav'}, {res['max_new_tokens']} steps each ({meta['server']})"
    )
    print(
        f"ok {res['ok']}/{res['requests']}  errors {res['errors'] or 'none'}  requests/s {res['requests_per_s']:.2f}  "
        f"TTFB p50/p95 {fmt(res['ttfb_p50_s'])}/{fmt(res['ttfb_p95_s'])} s  "
        f"latency p50/p95 {fmt(res['latency_p50_s'])}/{fmt(res['latency_p95_s'])} s"
    )
    if a.json_path:
        write_json(a.json_path, {"meta": meta, "result": res})
    return 0 if res["ok"] == res["requests"] else 1

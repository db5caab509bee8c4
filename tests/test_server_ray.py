"""The speech server as Ray Serve replicas: a local Ray instance on this machine (2 CPUs, shared by the live tests of
this module), replicas of the tiny demo model behind Serve's HTTP proxy on 127.0.0.1, answering whole and streamed
requests; a full replica's own JSON 429s and /health; `python -m dia_fast.serve --ray` stopped by SIGTERM; and the
deployment's options, health check and accounting without Ray. Skipped when ray[serve] is not installed; every loop
is bounded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from dia_fast.serve import ServerSettings  # noqa: E402
from dia_fast.serve.ray_app import (  # noqa: E402
    _interrupt,
    app_builder,
    build_application,
    configure_replica_logging,
    replica_settings,
)

LONG = {"model": "tts-1", "voice": "S1", "input": "Long.", "response_format": "pcm", "temperature": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(base: str, name: str, **labels: str) -> float:
    """A metric's value from /metrics (0 when absent); ``labels`` must all match."""
    return _value(httpx.get(f"{base}/metrics", timeout=30).text, name, **labels)


def _value(text: str, name: str, **labels: str) -> float:
    """A metric's value in Prometheus text (summed over the series whose labels include ``labels``; 0: none)."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


# ---------------------------------------------------------------------------------- a subprocess with its own Ray
def test_sigterm_stops_the_ray_cli_gracefully(tmp_path):
    """`python -m dia_fast.serve --ray` (its own local Ray): SIGTERM while a stream runs lets the stream finish
    (speech.audio.done), then the CLI exits 0 without a traceback (it aborted before). First in this module, before
    the shared Ray instance starts (two on 2 CPUs would be slow)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", RAY_DISABLE_USAGE_STATS="1")
    cmd = [sys.executable, "-m", "dia_fast.serve", "--ray", "--port", str(port), "--max-batch", "1"]
    out_path = tmp_path / "cli.log"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            time.sleep(1)
        assert proc.poll() is None, out_path.read_text(errors="replace")[-3000:]
        body = {**LONG, "stream_format": "sse", "max_new_tokens": 600, "min_new_tokens": 584}
        events: list[str] = []
        with httpx.stream("POST", f"{base}/v1/audio/speech", json=body, timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)
        assert '"speech.audio.done"' in events[-1], events[-1][:200]
        rc = proc.wait(timeout=90)
        text = out_path.read_text(errors="replace")
        assert rc == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# ---------------------------------------------------------------------------------- one Ray instance, shared
@pytest.fixture(scope="module")
def ray_base() -> Iterator[str]:
    """Ray (2 CPUs) with Serve's proxy on 127.0.0.1: its base URL. The tests deploy the app "dia_fast" at / and
    delete it after."""
    import ray
    from ray import serve

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def _deployed(app) -> Iterator[None]:  # noqa: ANN001
    from ray import serve

    serve.run(app, name="dia_fast", route_prefix="/")
    try:
        yield
    finally:
        serve.delete("dia_fast")


def test_two_ray_serve_replicas_answer_whole_and_streamed_requests(ray_base):
    base = ray_base
    with _deployed(build_application(ServerSettings(max_batch=2), replicas=2, cpus_per_replica=0.5)):
        pids = set()
        for _ in range(40):  # Serve spreads requests over the replicas: both answer within a few
            health = httpx.get(f"{base}/health", timeout=30).json()
            assert health["status"] == "ok" and health["demo"] is True
            pids.add(health["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2
        client = openai.OpenAI(api_key="unused", base_url=f"{base}/v1", max_retries=0, timeout=120)
        wav = client.audio.speech.create(
            model="tts-1",
            voice="S1",
            input="Hello from Ray.",
            response_format="wav",
            extra_body={"temperature": 0, "max_new_tokens": 40},
        )
        assert wav.content[:4] == b"RIFF" and len(wav.content) > 44
        body = {"temperature": 0, "max_new_tokens": 200, "min_new_tokens": 150}
        with client.audio.speech.with_streaming_response.create(
            model="tts-1",
            voice="S2",
            input="Streamed through Serve.",
            response_format="pcm",
            stream_format="audio",
            extra_body=body,
        ) as resp:
            parts = list(resp.iter_bytes())
        assert len(parts) >= 3 and sum(map(len, parts)) > 0


def test_a_full_replica_answers_its_own_429s_and_health(ray_base):
    """One replica, 1 slot + 1 queue place, both taken by streams: a burst of whole-file requests gets the engine's
    JSON 429s at once (Ray no longer holds them in its proxy), /health and /metrics answer meanwhile; a whole-file
    client that leaves is counted as a cancel (Ray cancels the request's task); the replica's dia_fast INFO lines
    reach its log (--log-level info)."""
    import ray

    base = ray_base
    app = build_application(ServerSettings(max_batch=1, max_queue=1), cpus_per_replica=0.5, log_level="info")
    long = {**LONG, "max_new_tokens": 3000, "min_new_tokens": 2984}
    with _deployed(app), httpx.Client(timeout=60) as client:
        pid = client.get(f"{base}/health").json()["pid"]
        with client.stream("POST", f"{base}/v1/audio/speech", json={**long, "stream_format": "audio"}) as running:
            assert running.status_code == 200
            chunks = running.iter_bytes()  # (kept: a dropped iterator would close the stream)
            next(chunks)  # it runs: the slot is busy
            queued_body = {**long, "stream_format": "audio", "seed": 1}
            with client.stream("POST", f"{base}/v1/audio/speech", json=queued_body) as queued:
                assert queued.status_code == 200  # (headers come once it is queued)
                t0 = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(5) as pool:
                    burst = list(pool.map(lambda i: client.post(f"{base}/v1/audio/speech", json=long), range(5)))
                assert time.monotonic() - t0 < 30
                for r in burst:
                    assert r.status_code == 429, r.text[:200]
                    assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["retry-after"]) >= 1
                t0 = time.monotonic()
                health = client.get(f"{base}/health", timeout=10)
                assert health.status_code == 200 and health.json()["busy_slots"] == 1 and health.json()["queued"] == 1
                assert client.get(f"{base}/metrics", timeout=10).status_code == 200
                assert time.monotonic() - t0 < 10
        deadline = time.monotonic() + 60  # both streams left: their slot and queue place free up
        while time.monotonic() < deadline and (
            _metric(base, "dia_fast_busy_slots") or _metric(base, "dia_fast_queue_depth")
        ):
            time.sleep(0.1)
        assert _metric(base, "dia_fast_busy_slots") == 0 and _metric(base, "dia_fast_queue_depth") == 0
        cancels = _metric(base, "dia_fast_cancelled_requests_total")
        whole_499 = _metric(base, "dia_fast_requests_total", stream="none", status="499")
        # a whole-file client that gives up once its request runs (a raw socket: leaving before Ray's proxy handed the
        # request to the replica would leave nothing to cancel or count)
        host, port = base.removeprefix("http://").rsplit(":", 1)
        body = json.dumps(long).encode()
        head = f"POST /v1/audio/speech HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not _metric(base, "dia_fast_busy_slots"):
                time.sleep(0.05)
            assert _metric(base, "dia_fast_busy_slots") == 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _metric(base, "dia_fast_cancelled_requests_total") == cancels:
            time.sleep(0.1)
        assert _metric(base, "dia_fast_cancelled_requests_total") == cancels + 1
        assert _metric(base, "dia_fast_requests_total", stream="none", status="499") == whole_499 + 1
        logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # (the replica's stderr: worker-*-PID.err)
        replica_log = "".join(p.read_text(errors="replace") for p in logs.glob(f"worker-*-{pid}.err"))
        assert re.search(r" INFO dia_fast\.serve: dia_fast .* serving 'dia-demo' on cpu, 1 slots", replica_log)


# ---------------------------------------------------------------------------------- without Ray running
def test_the_serve_config_builder_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown server settings"):
        app_builder({"modle": "x"})
    with pytest.raises(ValueError, match="log_level"):
        app_builder({"log_level": "loud"})
    scaled = app_builder({"max_batch": "2", "max_queue": "8", "replicas": "2", "max_replicas": "4"})._bound_deployment
    auto = scaled._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 4, 2)
    fixed = app_builder({"replicas": "3", "gpus_per_replica": "1"})._bound_deployment
    assert fixed.num_replicas == 3 and fixed.ray_actor_options["num_gpus"] == 1.0


def test_ray_leaves_the_engine_to_refuse_and_bounds_its_own_queue():
    """Ray sends a replica more than its engine's slots + queue (2 + 8 here), so the engine answers the excess with
    its JSON 429 and /health gets through; Ray's own queue in front of the replicas is bounded, and what overflows
    it is a 429 too (Ray 2.60's backpressure_config)."""
    import inspect

    from ray import serve

    d = build_application(ServerSettings(max_batch=2, max_queue=8))._bound_deployment
    assert d.max_ongoing_requests > 2 + 8
    assert 0 < d.max_queued_requests <= 64
    if "backpressure_config" in inspect.signature(serve.deployment).parameters:
        assert d._deployment_config.backpressure_config.status_code == 429


@pytest.mark.parametrize(
    ("device", "gpus", "expected"),
    [("cpu", 1.0, ("cpu", 8)), (None, 0.0, ("cpu", 8)), (None, 1.0, ("cuda", 16)), ("mps", 0.0, ("mps", 4))],
)
def test_a_replica_gets_its_devices_slots(device, gpus, expected):
    """The slots Ray plans with are the engine's default for the replica's device (16 CUDA, 4 MPS, 8 CPU), not a
    guess from gpus_per_replica; without --device a replica with GPUs uses cuda, one without the CPU."""
    pinned = replica_settings(ServerSettings(device=device), gpus)
    assert (pinned.device, pinned.max_batch) == expected
    app = build_application(ServerSettings(device=device), max_replicas=2, gpus_per_replica=gpus)
    assert app._bound_deployment._deployment_config.autoscaling_config.target_ongoing_requests == expected[1]


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_cuda_replica_without_a_gpu_reserved_is_refused(device):
    """Ray does not hide a node's GPUs from replicas that reserve none: they would all share cuda:0 unaccounted."""
    with pytest.raises(ValueError, match="gpus_per_replica > 0"):
        build_application(ServerSettings(device=device), gpus_per_replica=0.0)
    with pytest.raises(ValueError, match="gpus_per_replica"):
        app_builder({"device": device})


def test_the_replica_health_check_fails_once_the_engine_has():
    """Serve's check_health on a replica raises when its engine failed or stopped (then /health is 503 and every
    request 500), so that Serve replaces the replica; not while it runs, starts or shuts down."""
    cls = build_application(ServerSettings(max_batch=1))._bound_deployment.func_or_class

    def replica(*, failed: BaseException | None = None, running: bool = True, stopping: bool = False) -> object:
        service = SimpleNamespace(engine=SimpleNamespace(failed=failed, running=running), stopping=stopping)
        return SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(service=service)))

    cls.check_health(replica())
    cls.check_health(SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace())))  # (starting: no service yet)
    cls.check_health(replica(running=False, stopping=True))
    with pytest.raises(RuntimeError, match="failed"):
        cls.check_health(replica(failed=RuntimeError("a step failed"), running=False))
    with pytest.raises(RuntimeError, match="stopped"):
        cls.check_health(replica(running=False))


def test_sigterm_is_handled_as_ctrl_c():
    with pytest.raises(KeyboardInterrupt):
        _interrupt(signal.SIGTERM, None)


def test_replica_logging_follows_the_log_level():
    """A replica's dia_fast logger gets --log-level and one stderr handler (Ray configures only its own loggers)."""
    logger = logging.getLogger("dia_fast")
    saved = logger.level, list(logger.handlers), logger.propagate
    try:
        configure_replica_logging("error")
        assert logger.getEffectiveLevel() == logging.ERROR
        configure_replica_logging("info")  # (again: still one handler)
        assert logger.getEffectiveLevel() == logging.INFO
        added = [h for h in logger.handlers if h not in saved[1]]
        assert len(added) == 1 and isinstance(added[0], logging.StreamHandler)
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]


def test_ray_cli_options_are_checked_locally_only_without_a_cluster_address(tmp_path, monkeypatch, capsys):
    """--ray-address: the replicas run on the cluster's machines, so a checkpoint path, voices dir or CUDA device
    missing here is not an error; a negative --gpus-per-replica or CUDA without a GPU reserved always is."""
    from dia_fast.serve import ray_app
    from dia_fast.serve.__main__ import main

    calls = []
    monkeypatch.setattr(ray_app, "run_ray", lambda settings, **kw: calls.append((settings, kw)))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    remote = ["--ray", "--ray-address", "ray://head:10001", "--gpus-per-replica", "1", "--device", "cuda"]
    paths = ["--model", str(tmp_path / "on-the-cluster"), "--voices-dir", str(tmp_path / "voices")]
    assert main(remote + paths + ["--log-level", "warning"]) == 0
    assert len(calls) == 1 and calls[0][1]["address"] == "ray://head:10001" and calls[0][1]["log_level"] == "warning"
    assert not (tmp_path / "voices").exists()  # (not created on this machine)
    assert main(remote[:3] + ["--device", "cuda"]) == 2  # CUDA without a GPU reserved
    assert "gpus_per_replica > 0" in capsys.readouterr().err
    assert main(["--ray", "--ray-address", "ray://head:10001", "--gpus-per-replica", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["dia_fast.serve: error: --gpus-per-replica must be >= 0, got -1.0"]
    assert main(["--ray", "--model", str(tmp_path / "missing")]) == 2  # local: checked here
    assert "checkpoint not found" in capsys.readouterr().err
    assert len(calls) == 1
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # (a cluster too: ray.init joins it)
    assert main(["--ray", "--model", str(tmp_path / "missing")]) == 0 and len(calls) == 2


def test_ray_on_a_gpu_machine_without_gpus_per_replica_warns_that_replicas_run_on_the_cpu(monkeypatch):
    """The replicas' default device is the CPU unless each reserves a GPU: on a machine with one, say so."""
    from dia_fast.serve import __main__ as cli
    from dia_fast.serve import ray_app

    calls = []
    monkeypatch.setattr(ray_app, "run_ray", lambda settings, **kw: calls.append(settings))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cli, "_cuda_here", lambda: True)
    with pytest.warns(UserWarning, match="the replicas run on the CPU although this machine has a GPU"):
        assert cli.main(["--ray"]) == 0
    assert calls[-1].device is None  # (each replica picks: cpu without a GPU reserved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["--ray", "--device", "cpu"]) == 0  # asked for: no warning


def test_a_whole_file_request_whose_task_is_cancelled_is_counted_once():
    """Under Ray a whole-file client that leaves arrives as the request task's cancellation (uvicorn's apps see the
    disconnect instead): counted as a cancel and a 499, as uvicorn counts it, and the engine request is cancelled."""
    from dia_fast.api import DiaTTS
    from dia_fast.serve.service import SpeechRequest, SpeechService

    service = SpeechService(DiaTTS.random("tiny"), ServerSettings(max_batch=1))
    try:
        req = SpeechRequest(**{**LONG, "max_new_tokens": 3000, "min_new_tokens": 2984})

        async def never() -> bool:
            return False

        async def leave() -> None:
            task = asyncio.ensure_future(service.speech(req, never))
            for _ in range(300):  # (bounded: 30 s) until it runs
                await asyncio.sleep(0.1)
                if service.engine.busy_slots:
                    break
            assert service.engine.busy_slots == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(leave())
        text = service.metrics.render().decode()
        assert _value(text, "dia_fast_cancelled_requests_total") == 1
        assert _value(text, "dia_fast_requests_total") == 1  # (no other outcome)
        assert _value(text, "dia_fast_requests_total", format="pcm", stream="none", status="499") == 1
        assert _value(text, "dia_fast_errors_total") == _value(text, "dia_fast_errors_total", kind="cancelled") == 1
        deadline = time.monotonic() + 30
        while service.engine.busy_slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.engine.busy_slots == 0
    finally:
        service.close(drain=False)


@pytest.mark.parametrize("stream_format", [None, "audio"])
def test_a_task_cancelled_while_its_request_is_submitted_cancels_that_request(stream_format):
    """Cancelled while the submission runs in its worker thread: the submission still completes there, and its
    request is cancelled then (not left running in a slot with nobody to take its audio); counted as a cancel,
    whole-file or streamed."""
    import threading

    from dia_fast.api import DiaTTS
    from dia_fast.serve.service import SpeechRequest, SpeechService
    from dia_fast.serving import RequestCancelled

    service = SpeechService(DiaTTS.random("tiny"), ServerSettings(max_batch=1))
    entered, release, jobs = threading.Event(), threading.Event(), []
    real_submit = service._submit

    def slow_submit(req):
        entered.set()
        assert release.wait(30)
        jobs.append(real_submit(req))
        return jobs[-1]

    service._submit = slow_submit
    try:
        req = SpeechRequest(**{**LONG, "max_new_tokens": 3000, "min_new_tokens": 2984, "stream_format": stream_format})

        async def never() -> bool:
            return False

        async def leave() -> None:
            task = asyncio.ensure_future(service.open_stream(req) if stream_format else service.speech(req, never))
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            for _ in range(300):  # (bounded: 30 s) until the submission is done and its request cancelled
                await asyncio.sleep(0.1)
                if jobs and jobs[0].handle.done():
                    break

        asyncio.run(leave())
        assert jobs and jobs[0].handle.done()
        with pytest.raises(RequestCancelled):
            jobs[0].handle.result(0)
        deadline = time.monotonic() + 30
        while service.engine.busy_slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.engine.busy_slots == 0
        text = service.metrics.render().decode()
        assert _value(text, "dia_fast_cancelled_requests_total") == 1
        assert _value(text, "dia_fast_requests_total", status="499", stream=stream_format or "none") == 1
    finally:
        release.set()
        service.close(drain=False)


def test_a_whole_file_client_that_leaves_uvicorn_is_counted_once():
    """The same cancel under uvicorn (seen through is_disconnected, the task is not cancelled): counted once too."""
    from dia_fast.api import DiaTTS
    from dia_fast.serve import create_app
    from dia_fast.serve.local import serve_in_thread

    app = create_app(ServerSettings(max_batch=1), tts=DiaTTS.random("tiny"))
    with serve_in_thread(app, start_timeout=60) as local:
        base = local.url
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{base}/v1/audio/speech", json={**LONG, "max_new_tokens": 3000, "min_new_tokens": 2984}, timeout=2
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            _metric(base, "dia_fast_busy_slots") or not _metric(base, "dia_fast_cancelled_requests_total")
        ):
            time.sleep(0.05)
        time.sleep(0.5)  # (a second count would come right after the first)
        assert _metric(base, "dia_fast_cancelled_requests_total") == 1
        assert _metric(base, "dia_fast_requests_total") == 1
        assert _metric(base, "dia_fast_requests_total", stream="none", status="499") == 1
        assert _metric(base, "dia_fast_errors_total", kind="cancelled") == _metric(base, "dia_fast_errors_total") == 1

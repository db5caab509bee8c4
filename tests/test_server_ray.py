"""The speech server as Ray Serve replicas: a local Ray instance on this machine (2 CPUs), 2 replicas of the tiny
demo model behind Serve's HTTP proxy on 127.0.0.1, answering whole and streamed requests. Skipped when ray[serve] is
not installed; every loop is bounded."""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from dia_fast.serve import ServerSettings  # noqa: E402
from dia_fast.serve.ray_app import app_builder, build_application  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ray_serve_replicas_answer_whole_and_streamed_requests():
    import ray
    from ray import serve

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            build_application(ServerSettings(max_batch=2), replicas=2, cpus_per_replica=0.5),
            name="dia_fast",
            route_prefix="/",
        )
        base = f"http://127.0.0.1:{port}"
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
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_serve_config_builder_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown server settings"):
        app_builder({"modle": "x"})
    scaled = app_builder({"max_batch": "2", "max_queue": "8", "replicas": "2", "max_replicas": "4"})._bound_deployment
    auto = scaled._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (2, 4, 2)
    assert scaled.max_ongoing_requests == 2 + 8  # a replica's slots and queue
    fixed = app_builder({"replicas": "3", "gpus_per_replica": "1"})._bound_deployment
    assert fixed.num_replicas == 3 and fixed.ray_actor_options["num_gpus"] == 1.0

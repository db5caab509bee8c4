"""``python -m dia_fast.bench`` and its sub-modes: bad input is a one-line error before any work, outputs never
overwrite inputs, the JSON is strict, memory numbers do not depend on what ran before, warnings and Ctrl-C are
one line."""

from __future__ import annotations

import copy
import http.server
import json
import math
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import dia_fast.bench as bench
from dia_fast.api import DiaTTS
from dia_fast.bench import BenchOptions, main, parse_args, run_bench, server_load
from dia_fast.bench import compile_report as compile_report_mod
from dia_fast.bench.report import write_json
from dia_fast.paths import overwrites_input

ROOT = Path(__file__).resolve().parents[1]
TINY_RUN = ["--device", "cpu", "--compare", "none", "--steps", "24", "--repeat", "1", "--quiet"]


def _strict_json(text: str) -> object:
    """Parse as JSON proper: ``Infinity``, ``-Infinity`` and ``NaN`` (Python's extensions) are errors."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint with random weights (its codec in dac/)."""
    return DiaTTS.random("tiny", seed=0).save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny_ckpt")


def _error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The argparse error line of ``main(argv)`` (exit 2)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    return errors[0]


# ------------------------------------------------------------------------------------ 1. --json and the inputs


def test_json_may_not_overwrite_the_model_checkpoint_or_the_codec(checkpoint, tmp_path, capsys):
    config = checkpoint / "config.json"
    before = config.read_bytes()
    link = tmp_path / "link.json"
    link.symlink_to(config)
    for target in (config, checkpoint / "new.json", checkpoint / "dac" / "x.json", link):
        err = _error_of(["--model", str(checkpoint), *TINY_RUN, "--json", str(target)], capsys)
        assert "--json" in err and "--model" in err and str(checkpoint.resolve()) in err, err
    # a weights file as --model: its config.json beside it is an input too
    weights = next(checkpoint.glob("*.safetensors"))
    err = _error_of(["--model", str(weights), *TINY_RUN, "--json", str(config)], capsys)
    assert "would overwrite the --model" in err
    codec = checkpoint / "dac"
    err = _error_of(["--model", "tiny", "--codec", str(codec), *TINY_RUN, "--json", str(codec / "a.json")], capsys)
    assert "inside the --codec input" in err
    assert config.read_bytes() == before
    assert parse_args(["--model", str(checkpoint), "--json", str(tmp_path / "out.json")]).json_path  # beside: fine


def test_overwrites_input_helper(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "voice.wav").write_bytes(b"RIFF")
    inputs = {"--model": tmp_path / "ckpt", "--prompt": str(tmp_path / "voice.wav"), "--codec": None}
    assert "inside the --model input" in overwrites_input("--out", tmp_path / "ckpt" / "a" / "b.json", inputs)
    assert "would overwrite the --prompt input" in overwrites_input("--out", tmp_path / "voice.wav", inputs)
    assert overwrites_input("--out", tmp_path / "ckpt.json", inputs) is None  # a sibling, not inside
    assert overwrites_input("--out", tmp_path / "x.json", {"--model": tmp_path / "missing"}) is None


# ------------------------------------------------------------------------------------------------- 2. ~ in --json


def test_json_path_with_tilde_is_written_in_home(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    opts = parse_args(["--model", "tiny", *TINY_RUN, "--json", "~/b.json"])
    assert opts.json_path == str(home / "b.json")
    run_bench(opts)
    assert "results" in json.loads((home / "b.json").read_text())
    assert not (work / "~").exists()
    assert server_load.parse_args(["--server-load", "--json", "~/s.json"]).json_path == str(home / "s.json")
    assert compile_report_mod.parse_args(["--compile-report", "--json", "~/c.json"]).json_path == str(home / "c.json")


# ----------------------------------------------------------------------------------------- 3. strict JSON, null


def test_json_is_strict_with_null_for_non_finite_numbers(tmp_path):
    from dia_fast.bench.quality import quantization_quality

    tts = DiaTTS.random("tiny", seed=0)
    quality = quantization_quality(tts, tts, steps=24)  # the same model twice: no noise
    assert quality["audio_snr_db"] == math.inf
    doc = {"quality": quality, "x": [math.nan, 1.5, -math.inf], "t": (math.inf,)}
    text = write_json(tmp_path / "q.json", doc).read_text()
    parsed = _strict_json(text)
    assert parsed["quality"]["audio_snr_db"] is None
    assert parsed["quality"]["greedy_code_agreement"] == 1.0
    assert parsed["x"] == [None, 1.5, None] and parsed["t"] == [None]
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file, which is gone


# ---------------------------------------------------------------------------------------- 4. loading memory


def _python(code: str, *args: str, timeout: float = 120) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user runs it
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_loading_memory_measures_the_load_not_the_first_imports(checkpoint):
    """Two loads in one fresh process measure about the same peak (the first load used to include ~145 MiB of
    imports: ~158 MiB against ~13 MiB for the tiny checkpoint)."""
    code = (
        "import sys, json; from dia_fast.bench.loading import _load_once\n"
        "print(json.dumps([_load_once(sys.argv[1], 'none', 'cpu')['peak_bytes'] for _ in range(2)]))"
    )
    first, second = json.loads(_python(code, str(checkpoint)).splitlines()[-1])
    assert first > 0 and second > 0
    assert abs(first - second) <= 0.5 * max(first, second), (first / 2**20, second / 2**20)


# ------------------------------------------------------------------------------ 5. peak memory and --batch order


def test_peak_memory_of_a_batch_size_does_not_depend_on_the_order_of_batch(tmp_path):
    """Batch 1 measured first (absorbing a first call's one-time costs, 14 MiB against 5.6 MiB before the fix)
    or after batch 2: the same number within 30 % (CPU peak RSS of a tiny model, a few MiB, is noisy)."""
    peaks = {}
    for order in ("1,2", "2,1"):
        out = tmp_path / f"{order.replace(',', '_')}.json"
        cmd = "import sys; from dia_fast.bench import main; sys.exit(main(sys.argv[1:]))"
        _python(cmd, "--model", "tiny", *TINY_RUN, "--batch", order, "--json", str(out))
        rows = json.loads(out.read_text())["results"]
        peaks[order] = {r["batch"]: r["peak_memory_bytes"] for r in rows}
    a, b = peaks["1,2"][1], peaks["2,1"][1]
    assert abs(a - b) <= 0.3 * max(a, b), {k: {n: v / 2**20 for n, v in p.items()} for k, p in peaks.items()}


# ----------------------------------------------------------------------------------------- 6. --server-load --url


class _Stub(http.server.BaseHTTPRequestHandler):
    """/health answers what the test sets; POST /v1/audio/speech answers 200 with a few bytes; paths recorded."""

    health: tuple[int, bytes] = (200, b'{"status": "ok"}')
    paths: list[str] = []
    drop_posts = False  # True: close every POST's connection without an answer (a server that crashed)

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        self.paths.append(self.requestline.split()[1])  # as sent (self.path has a leading // collapsed)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._record()
        self._answer(*self.health) if self.path == "/health" else self._answer(404, b"{}")

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._record()
        if self.drop_posts:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._answer(200, b"\0" * 64) if self.path == "/v1/audio/speech" else self._answer(404, b"{}")


@pytest.fixture
def stub() -> Iterator[tuple[str, type[_Stub]]]:
    handler = type("Handler", (_Stub,), {"paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_server_load_url_with_a_trailing_slash(stub, tmp_path, capsys):
    url, handler = stub
    out = tmp_path / "s.json"
    argv = ["--server-load", "--url", url + "/", "--requests", "2", "--concurrency", "1", "--json", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert handler.paths == ["/health", "/v1/audio/speech", "/v1/audio/speech"]
    assert _strict_json(out.read_text())["result"]["ok"] == 2


def test_server_load_counts_dropped_connections_as_errors_and_writes_the_json(stub, tmp_path, monkeypatch, capsys):
    """A server that drops every request's connection: each is an error by its transport failure (no traceback), and
    the summary and the JSON are still written (exit 1: not every request succeeded)."""
    url, handler = stub
    handler.drop_posts = True
    # each request bounded in time (the default waits 600 s for an answer)
    run = server_load.run_server_load
    monkeypatch.setattr(server_load, "run_server_load", lambda *a, **k: run(*a, **k, timeout_s=10.0))
    out = tmp_path / "s.json"
    argv = ["--server-load", "--url", url, "--requests", "3", "--concurrency", "2", "--json", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr()
    assert "Traceback" not in err.err and "ok 0/3" in err.out, err
    res = _strict_json(out.read_text())["result"]
    assert res["ok"] == 0 and sum(res["errors"].values()) == 3, res
    assert all(key.startswith("transport: ") for key in res["errors"]), res
    assert res["latency_p95_s"] is None and res["requests_per_s"] == 0
    assert handler.paths == ["/health"] + ["/v1/audio/speech"] * 3


@pytest.mark.parametrize(
    ("status", "body", "ok"),
    [
        (404, b'{"detail": "Not Found"}', False),  # a wrong base URL (or another server)
        (200, b"<html>hello</html>", False),  # not a dia_fast server
        (503, b'{"status": "stopping"}', False),
        (503, b'{"status": "starting"}', True),  # the model is loading: requests wait for it
    ],
)
def test_server_load_requires_a_dia_fast_health_answer(stub, capsys, status, body, ok):
    url, handler = stub
    handler.health = (status, body)
    rc = main(["--server-load", "--url", url, "--requests", "1", "--concurrency", "1"])
    err = capsys.readouterr().err
    if ok:
        assert rc == 0 and handler.paths == ["/health", "/v1/audio/speech"], err
    else:
        assert rc == 2 and handler.paths == ["/health"]  # no request sent
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("dia_fast.bench: error: "), err
        assert f"answered {status}" in lines[0], err


# -------------------------------------------------------------------------- 7. sub-modes: one-line errors, Ctrl-C


def test_sub_mode_options_are_checked_before_any_work(tmp_path, capsys):
    for argv, message in (
        (["--server-load", "--json", str(tmp_path)], "--json is a directory"),
        (["--server-load", "--json", str(tmp_path / "no" / "s.json")], "directory does not exist"),
        (["--server-load", "--max-batch", "0"], "--max-batch must be a power of two >= 1, got 0"),
        (["--server-load", "--max-batch", "3"], "--max-batch must be a power of two >= 1, got 3"),
        (["--server-load", "--max-queue", "0"], "--max-queue must be >= 1"),
        (["--server-load", "--url", "http://127.0.0.1:9", "--max-batch", "2"], "--max-batch applies to the local"),
        # at its default value too: it would be ignored
        (["--server-load", "--url", "http://127.0.0.1:9", "--max-queue", "64"], "--max-queue applies to the local"),
        # every request would be refused: the local tiny demo model takes 17 to 3071 steps, a --url server >= 17
        (["--server-load", "--max-new-tokens", "16"], "--max-new-tokens must be at least 17"),
        (["--server-load", "--max-new-tokens", "0"], "--max-new-tokens must be at least 17"),
        (["--server-load", "--max-new-tokens", "3072"], "--max-new-tokens must be at most 3071"),
        (["--server-load", "--url", "http://127.0.0.1:9", "--max-new-tokens", "-1"], "must be at least 17"),
        (["--compile-report", "--json", str(tmp_path)], "--json is a directory"),
        (["--compile-report", "--json", str(tmp_path / "no" / "c.json")], "directory does not exist"),
        (["--load", "--arrival-rate", "1e-300"], "--arrival-rate must be between 0.1 and 1000000"),
        (["--load", "--arrival-rate", "0.01"], "--arrival-rate must be between 0.1 and 1000000"),
        (["--load", "--arrival-rate", "inf"], "--arrival-rate must be between 0.1 and 1000000"),
        (["--load", "--arrival-rate", "nan"], "--arrival-rate must be between 0.1 and 1000000"),
    ):
        assert message in _error_of(argv, capsys), argv
    assert not (tmp_path / "no").exists()  # no folder created
    assert parse_args(["--load", "--arrival-rate", "0.1"]).arrival_rate == 0.1
    assert server_load.parse_args(["--server-load", "--max-new-tokens", "17"]).max_new_tokens == 17
    assert (
        server_load.parse_args(["--server-load", "--url", "http://h:1", "--max-new-tokens", "9000"]).url == "http://h:1"
    )


def test_run_load_refuses_a_non_finite_arrival_rate():
    from dia_fast.bench.load import run_load

    with pytest.raises(ValueError, match="arrival_rate"):
        run_load(DiaTTS.random("tiny", seed=0), requests=1, arrival_rate=math.inf)


def test_ctrl_c_is_one_line_exit_130_and_keeps_the_partial_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "b.json"
    warm_up = bench.DiaFastCase.warm_up

    def interrupted_at_batch_2(self: bench.DiaFastCase) -> None:
        if self.batch == 2:
            raise KeyboardInterrupt
        warm_up(self)

    monkeypatch.setattr(bench.DiaFastCase, "warm_up", interrupted_at_batch_2)
    assert main(["--model", "tiny", *TINY_RUN, "--batch", "1,2", "--json", str(out)]) == 130
    assert capsys.readouterr().err.splitlines() == ["dia_fast.bench: interrupted"]
    doc = _strict_json(out.read_text())
    assert doc["meta"]["partial"] is True and [r["batch"] for r in doc["results"]] == [1]

    def interrupt(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(server_load, "run_server_load", interrupt)
    monkeypatch.setattr(compile_report_mod, "compile_report", interrupt)
    for argv in (["--server-load", "--requests", "1"], ["--compile-report", "--quiet"]):
        assert main(argv) == 130
        assert capsys.readouterr().err.splitlines() == ["dia_fast.bench: interrupted"]


# ------------------------------------------------------------------------------- 8. a folder named like a preset


@pytest.mark.filterwarnings("ignore:.*holds random weights")
def test_an_existing_path_wins_over_a_preset_name(checkpoint, tmp_path, monkeypatch):
    def no_preset(*args: object, **kwargs: object) -> None:
        raise AssertionError("built a preset instead of loading the checkpoint folder")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(DiaTTS, "random", no_preset)  # the 1.6B preset would take minutes and GBs
    for name in ("dia", "1.6b", "tiny"):
        (tmp_path / name).symlink_to(checkpoint, target_is_directory=True)
        tts, info = bench.build_tts(BenchOptions(model=name, device="cpu"), lambda msg: None)
        assert info["source"].startswith("checkpoint") and info["decoder_hidden_size"] == 64, name
        assert not bench.is_preset(name)
    assert bench.is_preset("dia-1.6b") and bench.is_preset("TINY")  # no such folder here


# ---------------------------------------------------------------------------------------- 9. --steps maximum


def test_steps_above_the_models_audio_length_are_refused_before_any_build(checkpoint, monkeypatch, capsys):
    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("built the model before checking --steps")

    monkeypatch.setattr(bench, "build_tts", no_build)
    for argv, message in (
        (["--model", "dia-1.6b", "--steps", "100000"], "--steps must be at most 3071"),  # Dia: 3072 positions
        (["--model", "dia", "--steps", "3072"], "--steps must be at most 3071"),
        (["--model", str(checkpoint), "--steps", "100000"], "--steps must be at most 3071"),
        (["--model", "tiny", "--quantize", "int8", "--quality-steps", "5000"], "--quality-steps must be at most 3071"),
        (["--model", "tiny", "--load", "--steps", "100000"], "--steps must be at most 3071"),
        (["--model", "tiny", "--steps", "5"], "--steps must be at least 17"),
    ):
        assert message in _error_of([*argv, "--device", "cpu"], capsys), argv
    assert parse_args(["--model", "dia-1.6b", "--steps", "3071"]).steps == 3071


# ------------------------------------------------------------------------------------- 10. repeated modes


def test_a_repeated_quantize_compare_or_cuda_int8_entry_is_an_error(capsys):
    for argv, message in (
        (["--quantize", "int8,int8"], "--quantize lists int8 twice"),
        (["--quantize", "int8, fp8,int8"], "--quantize lists int8 twice"),
        (["--compare", "eager,transformers,eager"], "--compare: lists eager twice"),
        (["--compare", "Eager,eager"], "--compare: lists eager twice"),
        (["--quantize", "int8", "--cuda-int8", "torchao,torchao"], "--cuda-int8 lists torchao twice"),
    ):
        assert message in _error_of(argv, capsys), argv


# ------------------------------------------------------------------------------------------- 11. warnings


def test_warnings_are_one_line_each(checkpoint, capsys):
    assert main(["--model", str(checkpoint), *TINY_RUN]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if "warning" in line.lower()]
    assert warned and all(line.startswith("dia_fast.bench: warning: ") for line in warned), err
    assert any("random weights" in line for line in warned)
    assert not any("UserWarning" in line or "from_pretrained(" in line for line in err), err


def test_the_precision_floor_compares_the_model_with_a_float32_copy_of_its_weights():
    """The quality block's floor: a bf16 model against float32 on the same weights differs by bf16's rounding (not
    zero, well under the int8 tests' bounds for the tiny preset); a float32 model has no floor."""
    from dia_fast.bench.quality import precision_floor

    fp32 = DiaTTS.random("tiny", seed=0, device="cpu")
    assert precision_floor(fp32, steps=24) is None
    bf16 = DiaTTS(copy.deepcopy(fp32.model).to(torch.bfloat16), fp32.codec)
    floor = precision_floor(bf16, steps=24)
    assert floor["dtype"] == "bfloat16" and floor["reference_dtype"] == "float32"
    assert floor["teacher_forced_positions"] > 16 and len(floor["top1_agreement"]) == 9
    assert 1e-4 < floor["rel_logit_error"] < 0.05 and floor["top1_agreement_mean"] > 0.9, floor
    assert fp32.model.decoder.logits_dense.weight.dtype == torch.float32  # the copy left the model as it was

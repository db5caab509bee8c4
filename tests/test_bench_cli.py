"""``python -m dia_fast.bench``: runs on CPU with the tiny model and writes JSON with every field;
its transformers baseline holds the same weights as dia_fast."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dia_fast.bench as bench
from dia_fast.api import DiaTTS
from dia_fast.bench import BenchOptions, default_compare, main, parse_args, run_bench
from dia_fast.bench.report import table
from dia_fast.bench.runners import RunResult, TransformersCase, build_transformers
from dia_fast.generation.generate import generate_codes
from dia_fast.generation.sampling import SamplingConfig
from dia_fast.text import encode_batch

ROOT = Path(__file__).resolve().parents[1]
RESULT_FIELDS = {
    "engine",
    "batch",
    "steps",
    "decode_steps_per_s",
    "decode_steps_per_s_runs",
    "audio_tokens_per_s",
    "realtime_factor",
    "time_to_first_audio_s",
    "prefill_s",
    "decode_s",
    "total_s",
    "warmup_s",
    "peak_memory_bytes",
    "memory_kind",
    "speedup",
    "speedup_end_to_end",
    "notes",
}
META_FIELDS = {
    "device",
    "device_name",
    "dtype",
    "torch",
    "transformers",
    "dia_fast",
    "ops_backends",
    "ops_backends_used",
    "codec_frame_rate",
    "steps",
    "batches",
    "memory",
    "wall_s",
}


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: no Triton interpreter on CPU
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "dia_fast.bench", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_bench_tiny_cpu_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run_cli(
        "--model", "tiny", "--device", "cpu", "--batch", "1,2", "--steps", "24", "--repeat", "1", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "[bench" in proc.stderr  # progress
    assert "transformers" in proc.stdout and "steps/s" in proc.stdout  # the table
    doc = json.loads(out.read_text())
    meta, results = doc["meta"], doc["results"]
    assert META_FIELDS <= set(meta)
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert meta["torch"] == torch.__version__
    assert set(meta["ops_backends"]) == set(meta["ops_backends_used"]) and meta["ops_backends"]
    assert meta["wall_s"] < 60
    assert meta["compare"] == ["transformers", "eager"]  # CPU default: no transformers-compile unless asked
    assert any("transformers-compile" in n for n in meta["notes"])
    engines = {(r["engine"], r["batch"]) for r in results}
    assert engines == {(e, b) for e in ("dia_fast", "dia_fast-eager", "transformers") for b in (1, 2)}
    rate = meta["codec_frame_rate"]
    for r in results:
        assert RESULT_FIELDS <= set(r)
        assert r["steps"] == (23 if r["engine"] == "transformers" else 24)  # its first token is prefill's
        assert r["decode_steps_per_s"] > 0 and r["prefill_s"] > 0 and r["warmup_s"] > 0
        assert r["audio_tokens_per_s"] == pytest.approx(r["decode_steps_per_s"] * 9 * r["batch"])
        assert r["realtime_factor"] == pytest.approx(r["decode_steps_per_s"] / rate)
        assert r["decode_steps_per_s"] == pytest.approx(r["steps"] / r["decode_s"])
        assert len(r["decode_steps_per_s_runs"]) == meta["repeat"]  # every timed run; the fastest is kept
        assert max(r["decode_steps_per_s_runs"]) == pytest.approx(r["decode_steps_per_s"])
        assert r["peak_memory_bytes"] > 0 and r["memory_kind"].startswith("cpu_peak_rss")
        if r["engine"] == "dia_fast":
            assert set(r["speedup"]) == {"transformers", "dia_fast-eager"}
            base = next(x for x in results if x["engine"] == "transformers" and x["batch"] == r["batch"])
            assert r["speedup"]["transformers"] == pytest.approx(r["decode_steps_per_s"] / base["decode_steps_per_s"])
        if r["engine"] == "dia_fast" and r["batch"] == 1:
            assert 0 < r["time_to_first_audio_s"] < r["total_s"] + r["warmup_s"] + 10
        else:
            assert r["time_to_first_audio_s"] is None


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])
    for bad in (["--load", "--max-slots", "3"], ["--load", "--requests", "0"], ["--load", "--arrival-rate", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    opts = parse_args(["--batch", "1,8", "--compare", "none", "--layers", "2"])
    assert opts.batches == (1, 8) and opts.compare == () and opts.layers == 2
    with pytest.raises(SystemExit):  # the preset's config is known: checked when parsing, before any build
        main(["--model", "tiny", "--device", "cpu", "--steps", "5", "--compare", "none", "--quiet"])
    assert "--steps must be at least 17" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--steps must be at least 17"):  # and by run_bench (the Python API)
        run_bench(BenchOptions(model="tiny", device="cpu", steps=5, compare=(), quiet=True))
    # options that the mode would ignore, repeated batch sizes, an unusable --json: errors before any work
    for bad, message in (
        (["--load", "--batch", "2"], "--batch does not apply to --load"),
        (["--load", "--batch", "1"], "--batch does not apply to --load"),  # also at its default value
        (["--requests", "16"], "--requests applies to --load only"),
        (["--load", "--quantize", "int8"], "--quantize does not apply to --load"),
        (["--load", "--count-launches"], "--count-launches does not apply to --load"),
        (["--requests", "3"], "--requests applies to --load only"),
        (["--max-slots", "4"], "--max-slots applies to --load only"),
        (["--quality-steps", "50"], "--quality-steps applies to --quantize only"),
        (["--cuda-int8", "torchao"], "--cuda-int8 applies to --quantize only"),
        (["--batch", "1,1"], "--batch lists a size twice"),
        (["--chunk-frames", "0"], "--chunk-frames and --first-chunk-frames must be >= 1"),
        (["--json", "."], "--json is a directory: ."),
        (["--threads", "100000"], "is more than 4x this machine's"),
        (["--load", "--steps", "8"], "--steps must be at least 17"),
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)
        assert message in capsys.readouterr().err, bad
    tiny = ["--model", "tiny", "--device", "cpu", "--quiet"]
    for bad, message in (
        (["--compare", "none", "--quantize", "int8,fp8"], "quantize=fp8 has no CPU kernel"),  # before int8 runs
        (["--compare", "none", "--quantize", "int8", "--cuda-int8", "torchao"], "--cuda-int8 chooses CUDA's int8"),
    ):
        assert main([*tiny, *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad


def test_server_load_against_an_unreachable_server_is_a_one_line_error(capsys):
    assert main(["--server-load", "--url", "http://127.0.0.1:9", "--requests", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dia_fast.bench: error: cannot reach the server at http://127.0.0.1:9")
    assert len(err.splitlines()) == 1


def test_bench_runs_each_cuda_int8_kernel_as_an_engine_of_its_own(capsys):
    """--cuda-int8 torchao,dia_fast: on CUDA the int8 and int4 modes run once per int8 kernel, labelled; fp8 and
    the CPU have one engine per mode."""
    from dia_fast.bench import _quant_variants

    opts = parse_args(["--quantize", "int8,fp8,int4", "--cuda-int8", "torchao,dia_fast"])
    assert opts.cuda_int8 == ("torchao", "dia_fast")
    assert _quant_variants(opts, torch.device("cuda")) == [
        ("int8", "torchao", "int8-torchao"),
        ("int8", "dia_fast", "int8-dia_fast"),
        ("fp8", None, "fp8"),
        ("int4", "torchao", "int4-torchao"),
        ("int4", "dia_fast", "int4-dia_fast"),
    ]
    cpu = [("int8", None, "int8"), ("fp8", None, "fp8"), ("int4", None, "int4")]
    assert _quant_variants(opts, torch.device("cpu")) == cpu
    one = parse_args(["--quantize", "int8", "--cuda-int8", "dia_fast"])
    assert _quant_variants(one, torch.device("cuda")) == [("int8", "dia_fast", "int8")]
    assert _quant_variants(parse_args(["--quantize", "int8"]), torch.device("cuda")) == [("int8", None, "int8")]
    with pytest.raises(SystemExit):
        parse_args(["--quantize", "int8", "--cuda-int8", "cutlass"])
    assert "--cuda-int8: unknown kernel(s) cutlass; valid: torchao, dia_fast" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
def test_transformers_baseline_has_the_same_weights():
    """The baseline is the same model: transformers' greedy generate equals dia_fast's codes."""
    tts = DiaTTS.random("tiny", seed=0)
    hf, processor = build_transformers(tts)
    texts = ["[S1] Same weights, same codes. [S2] Yes!", "[S1] Two items."]
    ref = hf.generate(
        **processor(text=texts, padding=True), max_new_tokens=40, do_sample=False, guidance_scale=3.0, top_k=45
    )
    ids, mask = encode_batch(texts)
    out = generate_codes(tts.model, ids, mask, max_new_tokens=40, sampling=SamplingConfig(do_sample=False))
    assert torch.equal(out.delayed, ref)


def test_default_compare_lists():
    assert default_compare("cuda") == ("transformers", "transformers-compile", "eager")
    assert default_compare(torch.device("cuda", 0)) == ("transformers", "transformers-compile", "eager")
    assert default_compare("cpu") == ("transformers", "eager")
    assert default_compare("mps") == ("transformers", "eager")
    assert parse_args([]).compare is None  # resolved per device by run_bench
    assert parse_args(["--compare", "transformers-compile"]).compare == ("transformers-compile",)
    assert parse_args(["--compare", " Transformers , transformers-compile,eager "]).compare == (
        "transformers",
        "transformers-compile",
        "eager",
    )


def test_unknown_compare_name_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--compare", "transformers,onnx"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1
    assert "'onnx'" in err[0] and "'transformers'" not in err[0]  # names only the bad entry
    for name in ("transformers", "transformers-compile", "eager", "none"):
        assert name in err[0]
    with pytest.raises(ValueError, match=r"'torch-compile'.*transformers, transformers-compile, eager"):
        run_bench(BenchOptions(compare=("torch-compile",), quiet=True))


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
def test_transformers_compile_runner_uses_the_compiled_forward():
    """transformers-compile through transformers' own path (static cache + ``compile_config``), with
    Dynamo's ``aot_eager`` backend instead of inductor, whose cold C++ compile takes 30-45 s on a 2-core
    CPU: covers Dynamo tracing and AOTAutograd of the decode step with the static cache (everything but
    inductor's code generation), that every decode step runs the compiled call, no recompiles after the
    warm-up call, the same codes as eager transformers, and the timing fields."""
    torch.compiler.reset()
    tts = DiaTTS.random("tiny", seed=0)
    hf, processor = build_transformers(tts)
    texts, steps = ["[S1] Same weights, same codes. [S2] Yes!"], 24
    data = tts.config.data
    case = TransformersCase(
        hf,
        processor,
        texts,
        steps,
        SamplingConfig(do_sample=False),
        channels=data.channels,
        frame_rate=tts.codec.frame_rate,
        compiled=True,
        compile_backend="aot_eager",
    )
    assert case.engine == "transformers-compile"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    case.warm_up()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the warm-up compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    compiled_call, calls = hf._compiled_call, []  # the torch.compile'd forward that generate() reuses

    def counted(*args, **kwargs):
        calls.append(1)
        return compiled_call(*args, **kwargs)

    hf._compiled_call = counted
    case.run()
    case.run()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile in timed calls
    assert len(calls) == 2 * (steps - 1)  # every decode step (prefill is eager) of both timed calls

    res = case.result()
    # the decode window holds steps - 1 forwards (the first token comes from the prefill forward)
    assert res.engine == "transformers-compile" and res.batch == 1 and res.steps == steps - 1
    assert res.decode_steps_per_s == pytest.approx((steps - 1) / res.decode_s)
    assert 0 < res.prefill_s < res.total_s and res.warmup_s > 0

    eager = hf.generate(
        **processor(text=texts, padding=True), max_new_tokens=steps, do_sample=False, guidance_scale=3.0, top_k=45
    )
    assert torch.equal(case.last_output, eager)  # (and eager transformers == dia_fast: the test above)


@pytest.mark.filterwarnings("ignore:`max_length` is ignored")
def test_bench_reports_speedups_vs_transformers_compile(monkeypatch):
    """run_bench with ``--compare transformers,transformers-compile`` on CPU (asked for explicitly):
    both rows, dia_fast's speed-up over each, the table column. The compile engine runs on the
    ``aot_eager`` backend here (see the test above for why)."""
    torch.compiler.reset()
    monkeypatch.setattr(bench, "TransformersCase", functools.partial(TransformersCase, compile_backend="aot_eager"))
    opts = BenchOptions(
        model="tiny", device="cpu", steps=24, compare=("transformers", "transformers-compile"), repeat=1, quiet=True
    )
    doc = run_bench(opts)
    rows = {r["engine"]: r for r in doc["results"]}
    assert set(rows) == {"dia_fast", "transformers", "transformers-compile"}
    assert doc["meta"]["compare"] == ["transformers", "transformers-compile"]
    fast, base = rows["dia_fast"], rows["transformers-compile"]
    assert set(fast["speedup"]) == {"transformers", "transformers-compile"}
    assert fast["speedup"]["transformers-compile"] == pytest.approx(
        fast["decode_steps_per_s"] / base["decode_steps_per_s"]
    )
    assert fast["speedup_end_to_end"]["transformers-compile"] == pytest.approx(base["total_s"] / fast["total_s"])
    assert base["steps"] == 23 and base["warmup_s"] > 0
    assert any("0 Dynamo compile(s)" in n for n in base["notes"])  # no recompile in the timed call
    assert not any("transformers-compile" in n for n in doc["meta"]["notes"])  # asked for: no "skipped" note
    assert "vs transformers-compile" in table([RunResult(**r) for r in doc["results"]])


def test_load_bench_cli_writes_json_for_every_mode(tmp_path):
    """``--load``: every mode runs the same requests (same frames), and throughput, latency and time to first
    audio are consistent with each other (TTFA <= latency; the speed-up is the ratio of throughputs)."""
    out = tmp_path / "load.json"
    proc = _run_cli(
        "--load",
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--requests",
        "3",
        "--max-slots",
        "2",
        "--steps",
        "40",
        "--repeat",
        "1",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "continuous-stream" in proc.stdout and "sequential" in proc.stdout  # the table
    doc = json.loads(out.read_text())
    meta, results = doc["meta"], doc["results"]
    assert "partial" not in meta  # the partial JSON written after each mode was replaced by the whole
    assert meta["load"]["max_slots"] == 2 and len(meta["load"]["requests"]) == 3
    assert len({r["seed"] for r in meta["load"]["requests"]}) == 3  # distinct seeds
    assert meta["torch_threads"] >= 1
    by_mode = {r["mode"]: r for r in results}
    assert set(by_mode) == {"continuous-stream", "continuous", "static", "sequential"}
    frames = {r["frames"] for r in results}
    assert len(frames) == 1 and frames.pop() > 0
    seq = by_mode["sequential"]["frames_per_s"]
    for r in results:
        assert r["frames_per_s"] > 0 and r["frames_per_s_runs"] == [r["frames_per_s"]]
        assert r["speedup_vs_sequential"] == pytest.approx(r["frames_per_s"] / seq)
        assert 0 < r["ttfa_p50_s"] <= r["latency_p50_s"] + 1e-9
        assert r["latency_p50_s"] <= r["latency_p95_s"] + 1e-9
    stream = by_mode["continuous-stream"]
    assert stream["ttfa_p50_s"] < stream["latency_p50_s"]  # the first chunk comes before the end
    assert stream["batched_steps"] > 0 and stream["decode_steps"] >= stream["batched_steps"]
    for mode in ("continuous-stream", "continuous"):  # the engine's own times: admission (prefill), queueing
        r = by_mode[mode]
        assert 0 < r["admission_s_p50"] <= r["admission_s_total"] <= r["wall_s"]  # one at a time, in the run
        assert 0 <= r["queued_s_p50"] <= r["queued_s_p95"] <= r["latency_p95_s"] + 1e-9
        assert f"{mode}: admission " in proc.stdout


def test_run_load_with_poisson_arrivals_and_bad_input():
    """Poisson arrivals are seeded and increasing; bad modes, counts and repeats are errors."""
    from dia_fast.bench.load import load_requests, run_load

    tts = DiaTTS.random("tiny", seed=0)
    a = load_requests(tts, 5, arrival_rate=20.0, min_tokens=20, max_tokens=40, seed=3)
    b = load_requests(tts, 5, arrival_rate=20.0, min_tokens=20, max_tokens=40, seed=3)
    assert a == b
    times = [r.arrival_s for r in a]
    assert times == sorted(times) and times[0] > 0
    assert all(20 <= r.max_new_tokens <= 40 for r in a)
    partials: list[dict] = []
    doc = run_load(
        tts,
        requests=2,
        max_slots=2,
        arrival_rate=50.0,
        min_tokens=20,
        max_tokens=30,
        modes=("continuous", "sequential"),
        repeat=2,
        on_progress=partials.append,
    )
    assert [r["mode"] for r in doc["results"]] == ["continuous", "sequential"] and "partial" not in doc
    # what a run stopped early keeps: after each mode's run but the last, the modes measured so far
    assert [[r["mode"] for r in p["results"]] for p in partials] == [["continuous"]] + [
        ["continuous", "sequential"]
    ] * 2
    assert all(p["partial"] for p in partials) and partials[0]["results"][0]["frames_per_s_runs"] == [
        doc["results"][0]["frames_per_s_runs"][0]
    ]
    with pytest.raises(ValueError, match="unknown load modes"):
        run_load(tts, modes=("batched",))
    with pytest.raises(ValueError, match="requests"):
        run_load(tts, requests=0)
    with pytest.raises(ValueError, match="repeat"):
        run_load(tts, requests=1, repeat=0)


def test_bench_records_threads_and_machine_load(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (7.5, 7.0, 6.0))  # a busy machine: a warning, then on
    try:
        doc = run_bench(
            parse_args(
                [
                    "--model",
                    "tiny",
                    "--device",
                    "cpu",
                    "--steps",
                    "20",
                    "--compare",
                    "none",
                    "--repeat",
                    "1",
                    "--threads",
                    "1",
                    "--quiet",
                ]
            )
        )
    finally:
        torch.set_num_threads(before)
    meta = doc["meta"]
    assert meta["torch_threads"] == 1
    assert meta["machine_load_at_start"] == {"loadavg_1m": 7.5, "cpus": os.cpu_count(), "busy": os.cpu_count() < 15}
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0"])


def test_cfg_scales_map_to_transformers_guidance_or_are_refused():
    """Same formula, different off switch: dia_fast's 0 is transformers' None; transformers turns guidance off at
    exactly 1 (and refuses 0-1), so those scales would compare different work and are refused."""
    from dia_fast.bench.runners import transformers_guidance

    assert transformers_guidance(3.0) == 3.0 and transformers_guidance(0.0) is None
    for scale in (0.5, 1.0):
        with pytest.raises(ValueError, match="no transformers equivalent"):
            transformers_guidance(scale)


def test_load_p95_is_never_above_the_largest_value():
    """16 requests (the default) all at once, finishing 0.1 s apart: the p95 lies between the two largest latencies,
    at 0.95 of the way through the sorted values (position 14.25 of 0..15: 1.5 + 0.25 * 0.1), not past the largest."""
    from dia_fast.bench.load import LoadRequest, _summary

    reqs = [LoadRequest("[S1] x", 20, i, 0.0) for i in range(16)]
    finish = [0.1 * (i + 1) for i in range(16)]
    first = [f / 2 for f in finish]
    s = _summary("continuous", reqs, finish, first, 16)
    assert s["latency_p95_s"] == pytest.approx(1.525) and s["latency_p95_s"] <= max(finish)
    assert s["ttfa_p95_s"] == pytest.approx(0.7625) and s["ttfa_p95_s"] <= max(first)
    four = _summary("static", reqs[:4], finish[:4], finish[:4], 4)  # few values: 0.3 + 0.85 * 0.1
    assert four["latency_p95_s"] == pytest.approx(0.385) and four["latency_p95_s"] <= 0.4
    one = _summary("sequential", reqs[:1], [0.7], [0.2], 1)
    assert (one["latency_p95_s"], one["ttfa_p95_s"]) == (0.7, 0.2)


def test_quantized_engines_of_each_cuda_int8_kernel_are_compared_with_full_precision():
    """With two --cuda-int8 kernels the engines are dia_fast-int8-torchao and dia_fast-int8-dia_fast: each is still a
    quantized engine, compared with the full-precision dia_fast row (dia_fast-eager, a baseline, is not)."""
    from dia_fast.bench.report import add_speedups

    def row(engine: str, rate: float) -> RunResult:
        return RunResult(engine, 1, 100, rate, rate * 9, rate / 86, 0.01, 100 / rate, 100 / rate + 0.01, 0.1, 0, "x")

    rows = [row("dia_fast", 300.0), row("dia_fast-int8-torchao", 360.0), row("dia_fast-int4-dia_fast", 390.0)]
    rows += [row("dia_fast-fp8", 330.0), row("dia_fast-eager", 150.0)]
    add_speedups(rows)
    by = {r.engine: r for r in rows}
    assert by["dia_fast-int8-torchao"].speedup == pytest.approx({"dia_fast-eager": 2.4, "dia_fast": 1.2})
    assert by["dia_fast-int4-dia_fast"].speedup == pytest.approx({"dia_fast-eager": 2.6, "dia_fast": 1.3})
    assert by["dia_fast-fp8"].speedup == pytest.approx({"dia_fast-eager": 2.2, "dia_fast": 1.1})
    assert by["dia_fast-int8-torchao"].speedup_end_to_end["dia_fast"] == pytest.approx(
        (1 / 3 + 0.01) / (1 / 3.6 + 0.01)
    )
    assert by["dia_fast"].speedup == pytest.approx({"dia_fast-eager": 2.0}) and by["dia_fast-eager"].speedup == {}


@pytest.mark.parametrize(("platform", "unit"), [("darwin", 1), ("linux", 1024)])
def test_peak_memory_from_ru_maxrss_in_the_units_of_the_platform(monkeypatch, platform, unit):
    """Where the peak RSS mark cannot be reset (no /proc: macOS, hence MPS too), ``ru_maxrss`` is read: bytes on
    macOS, KiB on Linux. A growth of 3,000,000 units is that many bytes on macOS and 1024x that on Linux."""
    import resource
    import types

    from dia_fast.bench import measure

    marks = iter([5_000_000, 8_000_000])
    monkeypatch.setattr(measure.sys, "platform", platform)
    monkeypatch.setattr(measure, "_reset_peak_rss", lambda: False)
    monkeypatch.setattr(measure, "_STATUS", Path("/no/such/proc/status"))
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=next(marks)))
    with measure.PeakMemory(torch.device("cpu")) as mem:
        pass
    assert mem.kind == "cpu_peak_rss_ru_maxrss"
    assert mem.peak_bytes == 3_000_000 * unit and mem.after_bytes == 0


def test_every_bench_command_of_the_gpu_check_parses(tmp_path):
    """benchmarks/gpu_check.sh runs only on a GPU, where a mistyped option costs a stage of scarce device time: each
    of its bench stages' command lines (continuations joined) must parse, as the script expands them."""
    import re
    import shlex

    script = (Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh").read_text().replace("\\\n", " ")
    base = re.search(r"^BENCH=\(\$PY -m dia_fast\.bench (.*)\)$", script, re.M)
    assert base is not None
    stages = re.findall(r'^stage (\w+) \d+ "\$\{BENCH\[@\]\}" (.*)$', script, re.M)
    assert {"quick", "load", "quant", "bench", "compile", "quality"} <= {name for name, _ in stages}
    for name, args in stages:
        args = args.replace('"$STEPS"', "512").replace('"$COMPARE_STEPS"', "256").replace("$OUTDIR", str(tmp_path))
        opts = parse_args([*shlex.split(base.group(1)), *shlex.split(args)])
        assert Path(opts.json_path).parent == tmp_path, name


def test_gpu_kernel_times_per_step_by_name_from_profiler_events():
    """--count-launches on CUDA: the profiler's GPU events give a count and a time per kernel name per step (CPU
    events are not GPU time), and the bench prints the total with the largest kernels."""
    from types import SimpleNamespace

    from dia_fast.bench import gpu_time_summary
    from dia_fast.bench.launches import kernels_by_name

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, device, us):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("gemm", cuda, 30.0), event("gemm", cuda, 50.0), event("norm", cuda, 4.0), event("aten::mm", cpu, 9)]
    counts, micros = kernels_by_name(events, steps=2)
    assert counts == {"gemm": 1.0, "norm": 0.5} and micros == {"gemm": 40.0, "norm": 2.0}
    line = gpu_time_summary({"cuda_kernel_us_per_step": 42.0, "cuda_kernel_us_by_name": micros})
    assert line == "42 us; largest: gemm 40 us (95%), norm 2 us (5%)"
    untimed = [SimpleNamespace(name="gemm", device_type=cuda)]
    assert kernels_by_name(untimed, steps=1) == ({"gemm": 1.0}, {})

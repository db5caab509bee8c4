"""``python -m dia_fast.bench``: runs on CPU with the tiny model and writes JSON with every field;
its transformers baseline holds the same weights as dia_fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dia_fast.api import DiaTTS
from dia_fast.bench import main, parse_args
from dia_fast.bench.runners import build_transformers
from dia_fast.generation.generate import generate_codes
from dia_fast.generation.sampling import SamplingConfig
from dia_fast.text import encode_batch

ROOT = Path(__file__).resolve().parents[1]
RESULT_FIELDS = {
    "engine",
    "batch",
    "steps",
    "decode_steps_per_s",
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
    engines = {(r["engine"], r["batch"]) for r in results}
    assert engines == {(e, b) for e in ("dia_fast", "dia_fast-eager", "transformers") for b in (1, 2)}
    rate = meta["codec_frame_rate"]
    for r in results:
        assert RESULT_FIELDS <= set(r)
        assert r["steps"] == 24
        assert r["decode_steps_per_s"] > 0 and r["prefill_s"] > 0 and r["warmup_s"] > 0
        assert r["audio_tokens_per_s"] == pytest.approx(r["decode_steps_per_s"] * 9 * r["batch"])
        assert r["realtime_factor"] == pytest.approx(r["decode_steps_per_s"] / rate)
        assert r["decode_steps_per_s"] == pytest.approx(r["steps"] / r["decode_s"])
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
        parse_args(["--compare", "onnx"])
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])
    opts = parse_args(["--batch", "1,8", "--compare", "none", "--layers", "2"])
    assert opts.batches == (1, 8) and opts.compare == () and opts.layers == 2
    assert main(["--model", "tiny", "--device", "cpu", "--steps", "5", "--compare", "none", "--quiet"]) == 2
    assert "--steps must be at least 17" in capsys.readouterr().err


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

"""Weight quantization (dia_fast.quantize): what the CPU runs (int8, int4), the one-line errors for what it cannot, and
the measured quality against the full-precision model on the same weights (tiny preset, fp32, seeded)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from dia_fast import DiaTTS
from dia_fast.bench.quality import quantization_quality
from dia_fast.checkpoint import CheckpointError
from dia_fast.config import DiaConfig
from dia_fast.model.int4 import Int4Linear
from dia_fast.model.int8 import Int8Linear
from dia_fast.quantize import check_quantize, quantize_decoder, quantized_mode, target_names


def test_int8_on_the_cpu_quantizes_the_decoder_gemms_and_generates():
    ref = DiaTTS.random("tiny", seed=0)
    q = DiaTTS.random("tiny", seed=0, quantize="int8")
    assert quantized_mode(q.model) == "int8" and quantized_mode(ref.model) is None
    dec = q.model.decoder
    names = target_names(q.model)
    assert len(names) == 6 * len(dec.layers) + 1 and names[-1] == "decoder.logits_dense"
    assert all(isinstance(q.model.get_submodule(n), Int8Linear) for n in names)
    # the int8 weights are those of the full-precision model, rounded per row
    deq = dec.logits_dense.weight_int8.float() * dec.logits_dense.weight_scale[:, None]
    full = ref.model.decoder.logits_dense.weight
    assert float((deq - full).abs().max()) <= float(full.abs().max()) / 127
    # the embeddings, cross-attention K/V and the encoder stay full precision
    assert isinstance(dec.embeddings.embed.weight, torch.nn.Parameter)
    assert isinstance(dec.layers[0].cross_attention.k_proj.weight, torch.nn.Parameter)
    assert not any(isinstance(m, Int8Linear) for m in q.model.encoder.modules())
    assert q.model.dtype == torch.float32 and q.model.device.type == "cpu"
    res = q.generate("[S1] Hello there.", max_new_tokens=40, do_sample=False, progress=False)
    assert res.codes[0].shape[0] > 0 and res.audio[0].size > 0
    with pytest.raises(ValueError, match="already quantized"):
        quantize_decoder(q.model, "int8")
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        quantize_decoder(DiaTTS.random("tiny").model, "int8", parts=("embeddings",))


def test_quality_of_int8_against_full_precision_on_the_same_weights():
    """Teacher-forced over 200 steps on the tiny preset: the numerical error of int8 (random weights bound it only;
    docs/quantization.md has the full-width numbers)."""
    ref = DiaTTS.random("tiny", seed=0)
    q = DiaTTS.random("tiny", seed=0, quantize="int8")
    quality = quantization_quality(ref, q, steps=200)
    assert quality["teacher_forced_positions"] >= 200
    # measured 0.0065 (docs/quantization.md); the lower bound shows the quantized model is what was measured
    assert 1e-4 < quality["rel_logit_error"] < 0.015
    assert min(quality["top1_agreement"]) > 0.95 and len(quality["top1_agreement"]) == 9
    assert 0.0 <= quality["greedy_code_agreement"] <= 1.0
    same = quantization_quality(ref, DiaTTS.random("tiny", seed=0), steps=40)  # the measure itself: 0 error
    assert same["rel_logit_error"] == 0.0 and same["greedy_code_agreement"] == 1.0 and same["audio_snr_db"] > 100


@pytest.mark.parametrize(
    ("mode", "device", "dtype", "match"),
    [
        ("fp8", "cpu", None, "quantize=fp8 has no CPU kernel.*on the CPU use int8 or int4"),
        ("int8", "cpu", torch.bfloat16, "float32 activations"),
        ("int4", "cpu", torch.float16, "quantize=int4 on the CPU runs with float32 activations"),
        ("int3", "cpu", None, "quantize must be one of int8, fp8, int4"),
        ("int8", "mps", None, "not supported on mps.*cpu \\(int8, int4\\) and cuda"),
    ],
)
def test_modes_a_device_cannot_run_are_one_line_errors(mode, device, dtype, match):
    with pytest.raises(ValueError, match=match):
        check_quantize(mode, device, dtype)


def test_cli_speaks_with_int8_and_rejects_fp8_on_the_cpu(tmp_path):
    out = tmp_path / "q.wav"
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia_fast",
            "[S1] Hello there.",
            "--quantize",
            "int8",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--seed",
            "0",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes()[:4] == b"RIFF"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia_fast",
            "[S1] Hello.",
            "--quantize",
            "fp8",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "x.wav"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "fp8" in bad.stderr and "Traceback" not in bad.stderr
    assert [line for line in bad.stderr.splitlines() if "error" in line] == [
        "dia_fast: error: quantize=fp8 has no CPU kernel in dia_fast: on the CPU use int8 or int4 (fp8 runs on CUDA)"
    ]


def test_bench_runs_quantized_engines_beside_the_full_precision_one(tmp_path):
    path = tmp_path / "q.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dia_fast.bench",
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--steps",
            "24",
            "--quantize",
            "int8",
            "--compare",
            "none",
            "--repeat",
            "1",
            "--quality-steps",
            "40",
            "--json",
            str(path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(path.read_text())
    engines = {row["engine"]: row for row in doc["results"]}
    assert {"dia_fast", "dia_fast-int8"} <= set(engines)
    assert set(engines["dia_fast-int8"]["speedup"]) == {"dia_fast"}
    block = doc["meta"]["quantize"]["int8"]
    assert block["bytes_after"] < block["bytes_before"] / 3
    assert {"rel_logit_error", "top1_agreement", "greedy_code_agreement", "audio_snr_db"} <= set(block["quality"])
    loading = doc["meta"]["loading"]  # one fresh process per mode
    assert set(loading) == {"none", "int8"} and all("error" not in row for row in loading.values())
    assert loading["int8"]["weight_bytes"] < loading["none"]["weight_bytes"]
    assert all(row["peak_bytes"] >= row["after_bytes"] >= 0 and row["load_s"] > 0 for row in loading.values())


def test_bench_of_a_saved_quantized_directory(tmp_path):
    """--model a saved quantized directory: transformers cannot load its weights, so the default baselines leave
    it out (with a note), asking for it or for --quantize is a one-line error."""
    from dia_fast.bench import BenchOptions, run_bench

    directory = DiaTTS.random("tiny", seed=0, quantize="int8").save_pretrained(tmp_path / "q")
    base = dict(model=str(directory), device="cpu", steps=24, repeat=1, quiet=True, batches=(1,))
    with pytest.raises(ValueError, match="holds int8-quantized weights, which transformers cannot load"):
        run_bench(BenchOptions(**base, compare=("transformers",)))
    with pytest.raises(ValueError, match="already int8-quantized: --quantize needs full precision"):
        run_bench(BenchOptions(**base, compare=("eager",), quantize=("int4",)))
    doc = run_bench(BenchOptions(**base))
    assert {r["engine"] for r in doc["results"]} == {"dia_fast", "dia_fast-eager"}
    assert any("int8-quantized checkpoint: no transformers baselines" in n for n in doc["meta"]["notes"])


def test_an_int8_model_saves_and_loads_back_as_it_is(tmp_path):
    """save_pretrained of an int8 model writes int8 weights with their scales (and quantization.json); from_pretrained
    loads them back without re-quantizing: the same greedy codes. A mismatched quantize= is an error."""
    q = DiaTTS.random("tiny", seed=0, quantize="int8")
    text = "[S1] Hello there, my friend."
    want = q.generate(text, max_new_tokens=40, do_sample=False, progress=False).codes[0]
    directory = q.save_pretrained(tmp_path / "q")
    assert json.loads((directory / "quantization.json").read_text())["mode"] == "int8"
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("decoder.layers.0.mlp.down_proj.weight_int8").dtype == torch.int8
    assert "decoder.layers.0.mlp.down_proj.weight" not in keys and "decoder.logits_dense.weight_int8" in keys
    assert "decoder.layers.0.self_attention.qkv_proj.weight_scale" in keys and "encoder.embedding.weight" in keys
    with pytest.warns(UserWarning, match="holds random weights"):  # saved from DiaTTS.random: still a demo
        back = DiaTTS.from_pretrained(directory, device="cpu", codec=q.codec)
    assert quantized_mode(back.model) == "int8" and back.demo
    assert torch.equal(back.generate(text, max_new_tokens=40, do_sample=False, progress=False).codes[0], want)
    assert DiaTTS.from_pretrained(directory, device="cpu", codec=q.codec, quantize="int8") is not None
    with pytest.raises(ValueError, match="holds int8-quantized weights; it cannot be loaded with quantize=fp8"):
        DiaTTS.from_pretrained(directory, device="cpu", quantize="fp8")
    with pytest.raises(ValueError, match="quantized layout only"):
        q.save_pretrained(tmp_path / "o", layout="official")
    with pytest.raises(ValueError, match="is part of a saved quantized model: load its directory"):
        DiaTTS.from_pretrained(directory / "model.safetensors", device="cpu")
    doc = json.loads((directory / "quantization.json").read_text())
    (directory / "quantization.json").write_text(json.dumps({**doc, "format": "dia_fast.dynamic-int8/1"}))
    with pytest.raises(ValueError, match="unknown quantized format 'dia_fast.dynamic-int8/1'.*quantize the full"):
        DiaTTS.from_pretrained(directory, device="cpu")
    for garbage, match in (("not json", "quantization.json: not valid JSON"), ("[1]", "expected a JSON object")):
        (directory / "quantization.json").write_text(garbage)
        with pytest.raises(ValueError, match=match):
            DiaTTS.from_pretrained(directory, device="cpu")


@pytest.mark.parametrize("layout", ["transformers", "official"])
def test_int8_quantizes_a_full_precision_checkpoint_tensor_by_tensor(tmp_path, layout, monkeypatch):
    """from_pretrained(quantize="int8") reads a safetensors checkpoint one tensor at a time (never the whole
    state dict) and gives exactly the weights of quantizing the loaded model: the same int8 tensors and scales."""
    import dia_fast.checkpoint as ckpt

    full = DiaTTS.random("tiny", seed=3)
    directory = full.save_pretrained(tmp_path / layout, layout=layout)

    def whole_state(*_a, **_k):
        raise AssertionError("read the whole checkpoint at once")

    monkeypatch.setattr(ckpt, "read_all", whole_state)
    q = DiaTTS.from_pretrained(directory, device="cpu", codec=full.codec, quantize="int8")
    monkeypatch.undo()
    want = DiaTTS.random("tiny", seed=3, quantize="int8")
    got_state, want_state = q.model.state_dict(), want.model.state_dict()
    assert got_state.keys() == want_state.keys()
    for key, value in want_state.items():
        assert torch.equal(got_state[key], value), key
    assert quantized_mode(q.model) == "int8" and q.model.dtype == torch.float32


def test_quantizing_while_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = DiaTTS.random("tiny", seed=1).save_pretrained(tmp_path / "m")
    state = load_file(str(directory / "model.safetensors"))
    state.pop("model.decoder.layers.0.mlp.down_proj.weight")
    state["model.decoder.layers.0.self_attention.q_proj.weight"] = state[
        "model.decoder.layers.0.self_attention.q_proj.weight"
    ][:-1].contiguous()
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        DiaTTS.from_pretrained(directory, device="cpu", quantize="int8")
    msg = str(err.value)
    assert "missing keys: decoder.layers.0.mlp.down_proj.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "mis-shaped keys: decoder.layers.0.self_attention.q_proj.weight" in msg


def test_quantizing_while_loading_rejects_a_truncated_or_non_finite_file(tmp_path):
    directory = DiaTTS.random("tiny", seed=1).save_pretrained(tmp_path / "m")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        DiaTTS.from_pretrained(directory, device="cpu", quantize="int8")
    from safetensors.torch import save_file

    state = DiaTTS.random("tiny", seed=1).model.state_dict()
    state = {f"model.{k}": v.contiguous() for k, v in state.items()}
    state["model.decoder.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="down_proj.weight holds NaN"):
        DiaTTS.from_pretrained(directory, device="cpu", quantize="int8")


def test_bench_can_skip_the_loading_measurement():
    from dia_fast.bench import parse_args

    assert parse_args(["--quantize", "int8"]).loading_memory is True
    assert parse_args(["--quantize", "int8", "--no-loading-memory"]).loading_memory is False


def test_int8_loads_an_official_pth_checkpoint_too(tmp_path):
    """A torch pickle (the official dia-v0_1.pth) is read whole, then quantized the same way."""
    from dia_fast.checkpoint import to_official

    full = DiaTTS.random("tiny", seed=4)
    directory = full.save_pretrained(tmp_path / "pth", layout="official")
    state = {k: v.detach().clone() for k, v in full.model.state_dict().items()}
    (directory / "model.safetensors").unlink()
    torch.save(to_official(state, full.config), directory / "dia-v0_1.pth")
    q = DiaTTS.from_pretrained(directory, device="cpu", codec=full.codec, quantize="int8")
    want = DiaTTS.random("tiny", seed=4, quantize="int8").model.state_dict()
    got = q.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())


# ---------------------------------------------------------------------------------------------- CPU int4


def test_int4_on_the_cpu_puts_the_mlp_in_int4_and_the_rest_in_int8():
    ref = DiaTTS.random("tiny", seed=0)
    q = DiaTTS.random("tiny", seed=0, quantize="int4")
    assert quantized_mode(q.model) == "int4"
    for name in target_names(q.model):
        kind = Int4Linear if ".mlp." in name else Int8Linear
        assert isinstance(q.model.get_submodule(name), kind), name
    # the int4 weights are the full-precision ones rounded per group of 64 or 128 columns: within half a step
    lin = q.model.decoder.layers[0].mlp.down_proj
    full = ref.model.decoder.layers[0].mlp.down_proj.weight
    from dia_fast.ops.reference import unpack_int4

    deq = unpack_int4(lin.weight_int4).float() * lin.weight_scale.repeat_interleave(lin.group, dim=1)
    step = lin.weight_scale.repeat_interleave(lin.group, dim=1)
    assert bool(((deq - full).abs() <= step / 2 + 1e-7).all()) and lin.group == 128
    res = q.generate("[S1] Hello there.", max_new_tokens=40, do_sample=False, progress=False)
    assert res.codes[0].shape[0] > 0 and res.audio[0].size > 0
    every = DiaTTS.random("tiny", seed=0).model
    quantize_decoder(every, "int4", int4_parts=("self_attention", "cross_attention", "mlp", "logits"))
    assert all(isinstance(every.get_submodule(n), Int4Linear) for n in target_names(every))
    with pytest.raises(ValueError, match="int4_parts must be a subset"):
        quantize_decoder(DiaTTS.random("tiny").model, "int4", int4_parts=("embeddings",))


def test_quality_of_int4_against_full_precision_on_the_same_weights():
    """Teacher-forced over 200 steps on the tiny preset (docs/quantization.md: measured 0.014 and 0.973)."""
    ref = DiaTTS.random("tiny", seed=0)
    quality = quantization_quality(ref, DiaTTS.random("tiny", seed=0, quantize="int4"), steps=200)
    assert 1e-3 < quality["rel_logit_error"] < 0.03  # (above 0: the int4 model, not the reference, was measured)
    assert min(quality["top1_agreement"]) > 0.93


def test_an_int4_model_saves_and_loads_back_as_it_is(tmp_path):
    q = DiaTTS.random("tiny", seed=0, quantize="int4")
    text = "[S1] Hello there, my friend."
    want = q.generate(text, max_new_tokens=40, do_sample=False, progress=False).codes[0]
    directory = q.save_pretrained(tmp_path / "q4")
    doc = json.loads((directory / "quantization.json").read_text())
    assert doc["mode"] == "int4" and doc["format"] == "dia_fast.int4-weight-only/1"
    assert doc["int4"]["decoder.layers.0.mlp.down_proj"] == 128 and "decoder.logits_dense" not in doc["int4"]
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        assert f.get_tensor("decoder.layers.0.mlp.down_proj.weight_int4").dtype == torch.uint8
        assert f.get_tensor("decoder.logits_dense.weight_int8").dtype == torch.int8
        assert tuple(f.get_tensor("decoder.layers.0.mlp.down_proj.weight_scale").shape) == (64, 1)
    back = DiaTTS.from_pretrained(directory, device="cpu", codec=q.codec)
    assert quantized_mode(back.model) == "int4"
    assert torch.equal(back.generate(text, max_new_tokens=40, do_sample=False, progress=False).codes[0], want)
    with pytest.raises(ValueError, match="holds int4-quantized weights; it cannot be loaded with quantize=int8"):
        DiaTTS.from_pretrained(directory, device="cpu", quantize="int8")
    (directory / "quantization.json").write_text(json.dumps({**doc, "format": "dia_fast.int8-weight-only/2"}))
    with pytest.raises(ValueError, match="unknown quantized format 'dia_fast.int8-weight-only/2' for mode 'int4'"):
        DiaTTS.from_pretrained(directory, device="cpu")
    bad = {**doc, "int4": {**doc["int4"], "decoder.layers.0.mlp.down_proj": 64}}  # scales saved for groups of 128
    (directory / "quantization.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="down_proj must be torch.uint8 .* with \\(64, 2\\) scales"):
        DiaTTS.from_pretrained(directory, device="cpu")
    bad_groups = [(0, "bad int4 groups"), ("128", "bad int4 groups"), (96, "down_proj: the group must divide 128")]
    for groups, match in bad_groups:
        bad = {**doc, "int4": {**doc["int4"], "decoder.layers.0.mlp.down_proj": groups}}
        (directory / "quantization.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            DiaTTS.from_pretrained(directory, device="cpu")
    bad = {**doc, "quantized": [*doc["quantized"], "decoder.layers.9.mlp.down_proj"]}  # a layer the model lacks
    (directory / "quantization.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="q4: ModuleList has no attribute `9`"):
        DiaTTS.from_pretrained(directory, device="cpu")


def test_an_int4_model_without_int4_parts_saves_in_the_int4_format(tmp_path):
    """``int4_parts=()`` leaves only int8 GEMMs in an int4 model: it still saves (the CPU int4 format, no int4
    GEMMs listed) and loads back as it was."""
    q = DiaTTS.random("tiny", seed=0)
    quantize_decoder(q.model, "int4", int4_parts=())
    directory = q.save_pretrained(tmp_path / "q4")
    doc = json.loads((directory / "quantization.json").read_text())
    assert doc["format"] == "dia_fast.int4-weight-only/1" and doc["int4"] == {}
    back = DiaTTS.from_pretrained(directory, device="cpu", codec=q.codec)
    assert quantized_mode(back.model) == "int4"
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(1, 200, (1, 20), generator=g), torch.ones(1, 20, dtype=torch.bool)
    codes = torch.randint(0, 1024, (1, 12, 9), generator=g)
    assert torch.equal(back.model(ids, mask, codes), q.model(ids, mask, codes))


def test_int4_quantizes_a_full_precision_checkpoint_tensor_by_tensor(tmp_path, monkeypatch):
    import dia_fast.checkpoint as ckpt

    full = DiaTTS.random("tiny", seed=3)
    directory = full.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(ckpt, "read_all", lambda *_a, **_k: pytest.fail("read the whole checkpoint at once"))
    q = DiaTTS.from_pretrained(directory, device="cpu", codec=full.codec, quantize="int4")
    monkeypatch.undo()
    want = DiaTTS.random("tiny", seed=3, quantize="int4").model.state_dict()
    got = q.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], v) for k, v in want.items())


def test_a_damaged_quantized_directory_is_a_one_line_error_and_loads_by_plain_reads(tmp_path):
    """A saved int8 directory whose quantization.json, weights file or full-precision tensors are damaged: a
    ValueError naming the directory, never a traceback from deep inside; a loaded model does not read its file again
    (plain reads: rewriting the file leaves it as it was)."""
    from safetensors.torch import load_file, save_file

    q = DiaTTS.random("tiny", seed=0, quantize="int8")
    directory = q.save_pretrained(tmp_path / "q")
    weights, qjson = directory / "model.safetensors", directory / "quantization.json"
    doc, state = json.loads(qjson.read_text()), load_file(str(weights))
    meta = {"format": "pt"}

    loaded = DiaTTS.from_pretrained(directory, device="cpu", codec=q.codec)
    before = loaded.model.decoder.layers[0].mlp.down_proj.weight_int8.clone()
    changed = dict(state)
    changed["decoder.layers.0.mlp.down_proj.weight_int8"] = torch.zeros_like(before)
    save_file(changed, str(weights), metadata=meta)  # the file changes under the loaded model
    assert torch.equal(loaded.model.decoder.layers[0].mlp.down_proj.weight_int8, before)
    save_file(state, str(weights), metadata=meta)

    for bad, match in (
        ({k: v for k, v in doc.items() if k != "quantized"}, r"missing or malformed quantized \(list\)"),
        ({**doc, "quantized": None}, r"missing or malformed quantized"),
        ({**doc, "format": ["x"]}, r"missing or malformed format \(str\)"),
        ({**doc, "quantized": [1, 2]}, r"quantized \(a list of GEMM names\)"),
        ({**doc, "int4": [64]}, r"int4 \(an object"),
    ):
        qjson.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            DiaTTS.from_pretrained(directory, device="cpu")
    qjson.write_text(json.dumps(doc))

    norm = "decoder.norm.weight"
    for tensors, error, match in (
        ({**state, norm: torch.full_like(state[norm], float("nan"))}, CheckpointError, "holds NaN or infinite"),
        ({**state, norm: state[norm][:-1].clone()}, CheckpointError, "does not match the model config"),
        ({**state, norm: state[norm].to(torch.int32)}, CheckpointError, "not floating point"),
        ({k: v for k, v in state.items() if k != norm}, CheckpointError, f"missing.*{norm}"),
    ):
        save_file(tensors, str(weights), metadata=meta)
        with pytest.raises(error, match=match) as caught:
            DiaTTS.from_pretrained(directory, device="cpu")
        assert str(directory) in str(caught.value)
    save_file(state, str(weights), metadata=meta)
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        DiaTTS.from_pretrained(directory, device="cpu")


def test_non_finite_or_tiny_weights_quantize_clearly():
    """NaN or infinite weights cannot be quantized: a ValueError naming the layer, the model left as it was. Rows of
    tiny weights keep a positive scale, so that the saved model loads back."""
    from dia_fast.model.int4 import quantize_groups
    from dia_fast.model.int8 import quantize_rows

    tts = DiaTTS.random("tiny", seed=0)
    name = "decoder.layers.0.mlp.down_proj"
    with torch.no_grad():
        tts.model.get_submodule(name).weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=f"{name}: the weight holds NaN or infinite values"):
        quantize_decoder(tts.model, "int8")
    assert quantized_mode(tts.model) is None and isinstance(tts.model.get_submodule(name), torch.nn.Linear)
    for value in (float("inf"), float("nan")):
        w = torch.ones(4, 64)
        w[2, 7] = value
        with pytest.raises(ValueError, match="row 2"):
            quantize_rows(w)
        with pytest.raises(ValueError, match="row 2"):
            quantize_groups(w, 64)
    tiny = torch.full((2, 64), 1e-43)
    for _q, scale in (quantize_rows(tiny), quantize_groups(tiny, 64)):
        assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())


def test_a_saved_quantized_model_loads_by_hub_id(tmp_path, monkeypatch):
    """A quantized directory on the hub: quantization.json is fetched with the weights, and the id loads as the
    directory does (it was fetched without it and read as a full-precision checkpoint of int8 tensors). The
    download is simulated by copying what the allow patterns select (no network in tests)."""
    import fnmatch
    import shutil

    import huggingface_hub

    q = DiaTTS.random("tiny", seed=0, quantize="int8")
    repo = q.save_pretrained(tmp_path / "repo")

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        snap = tmp_path / "snapshot"
        for f in repo.rglob("*"):
            rel = f.relative_to(repo).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (snap / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, snap / rel)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    loaded = DiaTTS.from_pretrained("someone/dia-int8", device="cpu")
    assert (tmp_path / "snapshot" / "quantization.json").is_file()
    for name, value in q.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name


def test_a_failed_quantization_leaves_the_model_as_it_was(tmp_path):
    """int4 needs columns in multiples of 64: a model with one GEMM that has not fails before any layer is
    replaced (it was left half-quantized, with no mode, and saved as an unloadable checkpoint); hand-made
    quantized layers are refused by save_pretrained."""
    tiny = DiaConfig.preset("tiny")  # with an MLP whose down GEMM has 96 columns
    decoder = dataclasses.replace(tiny.model.decoder, intermediate_size=96)
    cfg = dataclasses.replace(tiny, model=dataclasses.replace(tiny.model, decoder=decoder))
    tts = DiaTTS.random(cfg, seed=0)
    before = {k: v.clone() for k, v in tts.model.state_dict().items()}
    with pytest.raises(ValueError, match="down_proj"):
        quantize_decoder(tts.model, "int4")
    assert quantized_mode(tts.model) is None
    assert not any(isinstance(m, Int8Linear) for m in tts.model.modules())
    assert all(torch.equal(v, before[k]) for k, v in tts.model.state_dict().items())
    quantize_decoder(tts.model, "int8")  # and it can still be quantized otherwise
    name = "decoder.layers.0.mlp.down_proj"
    plain = DiaTTS.random("tiny", seed=0)
    parent, _, attr = name.rpartition(".")
    setattr(plain.model.get_submodule(parent), attr, Int8Linear.from_weight(plain.model.get_submodule(name).weight))
    with pytest.raises(ValueError, match="not quantized by dia_fast"):
        plain.save_pretrained(tmp_path / "hand")

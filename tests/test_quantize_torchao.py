"""The CUDA modes' quantization (torchao int8 / fp8 / int4), run on the CPU: torchao's int8 and fp8 tensors work
here as they are, and its int4 (tinygemm) tensors with PyTorch's CPU int4 ops standing in for the CUDA ones
(tests/torchao_cpu.py). The CUDA kernels themselves are the GPU check's (benchmarks/gpu_check.sh). Skipped where
torchao is not installed (it is in the ``test`` extra)."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch

from dia_fast import DiaTTS
from dia_fast.bench.measure import weight_bytes
from dia_fast.bench.quality import quantization_quality
from dia_fast.model.int4 import Int4Linear
from dia_fast.quantize import (
    INT4_PARTS,
    PARTS,
    check_quantize,
    gemm_kinds,
    load_cuda_quantized,
    quantize_cuda,
    stored_bytes,
    target_names,
    torchao_quantized,
)

from .torchao_cpu import cpu_tinygemm

pytest.importorskip("torchao")

CLASSES = {"int8": "Int8Tensor", "fp8": "Float8Tensor", "int4": "Int4TilePackedTo4dTensor"}


def _linear(out_features: int, in_features: int, seed: int = 0) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_features, in_features, generator=g))
    return lin.requires_grad_(False)


@pytest.mark.parametrize(("out_features", "in_features"), [(384, 256), (200, 64), (9, 96), (1028, 2048)])
def test_torchao_int4_really_quantizes_every_shape_of_the_model(out_features, in_features):
    """Group 128 where it divides the row, else 64 or 32; ragged row counts are padded by torchao. The output is the
    full-precision one within int4's error (4 bits over each group's range: ~12% of the output's norm for Gaussian
    weights), and not equal to it."""
    lin = _linear(out_features, in_features)
    x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = lin(x).float()
    with cpu_tinygemm():
        q = torchao_quantized(copy.deepcopy(lin), "int4")
        got = q(x).float()
    assert type(q.weight).__name__ == "Int4TilePackedTo4dTensor" and got.shape == want.shape
    assert q.weight.block_size[-1] == max(g for g in (128, 64, 32) if in_features % g == 0)
    rel = float((got - want).norm() / want.norm())
    assert 0.02 < rel < 0.2, rel
    if in_features % 1024 == 0:  # no column padding: a quarter of bf16's bytes, plus a bf16 scale and zero per group
        assert stored_bytes(q.weight) < 0.3 * lin.weight.numel() * 2


def test_torchao_int4_rejects_rows_no_group_divides():
    with pytest.raises(ValueError, match="int4 needs in_features divisible by 32, got 48"):
        torchao_quantized(_linear(64, 48), "int4")


@pytest.mark.parametrize(
    ("mode", "max_error", "min_top1"), [("int8", 0.015, 0.95), ("fp8", 0.05, 0.9), ("int4", 0.03, 0.93)]
)
def test_cuda_modes_quantize_every_target_and_keep_the_measured_quality(mode, max_error, min_top1):
    """Tiny preset in bf16, as on a GPU, teacher-forced over 200 steps against the same bf16 model unquantized
    (docs/quantization.md: int8 0.0084 / 0.980, fp8 0.029 / 0.943, int4 0.014 / 0.975)."""
    ref = DiaTTS.random("tiny", seed=0, dtype=torch.bfloat16)
    quant = DiaTTS(copy.deepcopy(ref.model), ref.codec)
    kinds = gemm_kinds(quant.model, mode, PARTS, INT4_PARTS)
    with cpu_tinygemm():
        quantize_cuda(quant.model, kinds, int8_kernel="torchao")
        assert set(kinds) == set(target_names(quant.model))
        for name, kind in kinds.items():  # int4: the MLP in int4, the rest in int8
            assert kind == (("int4" if ".mlp." in name else "int8") if mode == "int4" else mode)
            assert type(quant.model.get_submodule(name).weight).__name__ == CLASSES[kind], name
        quality = quantization_quality(ref, quant, steps=200)
    assert quality["teacher_forced_positions"] >= 200
    assert 1e-4 < quality["rel_logit_error"] < max_error  # (> 0: the quantized model was measured)
    assert min(quality["top1_agreement"]) > min_top1
    # the bench's weight bytes count what torchao stores, not the full-precision shape (int4 pads each row to a
    # multiple of 1024 columns: at the tiny widths that outweighs the 4 bits; see the full-width shape above)
    q_gemms = sum(stored_bytes(quant.model.get_submodule(n).weight) for n in kinds)
    full_gemms = sum(ref.model.get_submodule(n).weight.numel() * 2 for n in kinds)
    assert q_gemms < (0.9 if mode == "int4" else 0.55) * full_gemms
    assert weight_bytes(quant.model) < weight_bytes(ref.model)


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_a_replaced_torchao_weight_makes_new_decode_runners(mode):
    """torchao's weights report ``data_ptr() == 0``: the key under which captured steps are reused reads the
    addresses of the tensors inside them, so a replaced quantized weight is never read through a stale graph."""
    from dia_fast.generation.engine import engine_for

    tts = DiaTTS.random("tiny", seed=0, dtype=torch.bfloat16)
    name = target_names(tts.model)[0]
    with cpu_tinygemm():
        quantize_cuda(tts.model, gemm_kinds(tts.model, mode, PARTS, INT4_PARTS), int8_kernel="torchao")
        assert tts.model.get_submodule(name).weight.data_ptr() == 0  # (why the key looks inside)
        engine = engine_for(tts.model)
        before = engine._weights_key()
        assert before == engine._weights_key()  # nothing replaced: the same key
        layer = tts.model.get_submodule(name)
        other = copy.deepcopy(layer)  # the same values in new memory
        tts.model.get_submodule(name.rsplit(".", 1)[0]).register_module(name.rsplit(".", 1)[1], other)
        assert engine._weights_key() != before


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_the_torchao_loader_quantizes_each_gemm_as_its_weight_arrives(tmp_path, monkeypatch, mode):
    """The CUDA modes' loader (load_cuda_quantized): it reads the checkpoint one tensor at a time and gives
    exactly the model that quantizing after a full-precision load gives."""
    import dia_fast.checkpoint as ckpt
    from dia_fast.api import _finish_model
    from dia_fast.model import DiaModel

    full = DiaTTS.random("tiny", seed=3, dtype=torch.bfloat16)
    cfg, tensors, _ = ckpt.load_config_and_tensors(full.save_pretrained(tmp_path / "m"), None)
    monkeypatch.setattr(ckpt, "read_all", lambda *_a, **_k: pytest.fail("read the whole checkpoint at once"))
    with torch.device("meta"):
        model = DiaModel(cfg)
    with cpu_tinygemm():
        load_cuda_quantized(model, tensors, mode, torch.bfloat16, torch.device("cpu"), "test", int8_kernel="torchao")
        model = _finish_model(model, torch.device("cpu"), torch.bfloat16)
        want = copy.deepcopy(full.model)
        quantize_cuda(want, gemm_kinds(want, mode, PARTS, INT4_PARTS), int8_kernel="torchao")
        g = torch.Generator().manual_seed(0)
        ids, mask = torch.randint(1, 200, (1, 20), generator=g), torch.ones(1, 20, dtype=torch.bool)
        codes = torch.randint(0, 1024, (1, 12, 9), generator=g)
        assert torch.equal(model(ids, mask, codes), want(ids, mask, codes))
    for name in target_names(model):
        assert type(model.get_submodule(name).weight) is type(want.get_submodule(name).weight), name


@pytest.mark.parametrize(
    ("mode", "capability", "dtype", "match"),
    [
        ("fp8", (8, 6), torch.bfloat16, "quantize=fp8 needs compute capability 8.9\\+.*is 8.6: use int8 or int4"),
        ("int4", (7, 5), torch.float16, "quantize=int4 on CUDA needs compute capability 8.0\\+.*is 7.5: use int8"),
        ("int4", (9, 0), torch.float16, "quantize=int4 on CUDA runs with bfloat16.*got dtype torch.float16"),
    ],
)
def test_cuda_modes_a_gpu_cannot_run_are_one_line_errors(monkeypatch, mode, capability, dtype, match):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_a: capability)
    with pytest.raises(ValueError, match=match) as err:
        check_quantize(mode, "cuda", dtype)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("mode", "dtype"), [("int8", torch.float16), ("fp8", torch.bfloat16), ("int4", torch.bfloat16)]
)
def test_cuda_modes_a_gpu_can_run_pass_the_check(monkeypatch, mode, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_a: (9, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_quantize(mode, "cuda", dtype) == mode
    # fp8 runs, but slowly (torchao dequantizes per call: measured on an H200): the user is told once
    assert [str(w.message)[:40] for w in caught] == (
        ["quantize=fp8 on CUDA runs through torcha"] if mode == "fp8" else []
    )


@pytest.mark.parametrize(
    ("mode", "kernel", "needs_torchao"),
    [("int8", "dia_fast", False), ("int8", "torchao", True), ("fp8", "dia_fast", True), ("int4", "dia_fast", True)],
)
def test_cuda_int8_on_dia_fasts_kernel_does_not_need_torchao(monkeypatch, mode, kernel, needs_torchao):
    """int8 on dia_fast's Triton layer (the default) runs without torchao; fp8, int4 (tinygemm) and torchao's int8
    need it: a one-line error naming the mode, where it is missing."""
    import sys

    import dia_fast.quantize

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_a: (9, 0))
    monkeypatch.setattr(dia_fast.quantize, "CUDA_INT8_KERNEL", kernel)
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: importing it raises ImportError
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (fp8's slowness warning)
        if needs_torchao:
            with pytest.raises(ValueError, match=f"quantize={mode} on CUDA.* needs torchao: pip install torchao"):
                check_quantize(mode, "cuda", torch.bfloat16)
        else:
            assert check_quantize(mode, "cuda", torch.bfloat16) == mode
        if mode == "int8":  # the kernel asked for in the call, whatever the default
            other = "torchao" if kernel == "dia_fast" else "dia_fast"
            if other == "torchao":
                with pytest.raises(ValueError, match="quantize=int8 on CUDA on torchao's kernel needs torchao"):
                    check_quantize(mode, "cuda", torch.bfloat16, other)
            else:
                assert check_quantize(mode, "cuda", torch.bfloat16, other) == mode


def _load_saved_as_torchao(directory):
    """What from_pretrained does with a saved quantized directory on CUDA, here on the CPU (bf16)."""
    from safetensors.torch import load_file

    from dia_fast.api import _finish_model
    from dia_fast.config import DiaConfig
    from dia_fast.model import DiaModel
    from dia_fast.quantized_dir import cuda_from_saved, load_saved, read_quantization

    with torch.device("meta"):
        model = DiaModel(DiaConfig.from_json(directory / "config.json"))
    load_saved(model, load_file(str(directory / "model.safetensors")), read_quantization(directory), str(directory))
    cuda_from_saved(model, torch.device("cpu"), torch.bfloat16, int8_kernel="torchao")
    return _finish_model(model, torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_directory_saved_on_the_cpu_loads_into_torchao_weights_with_the_same_values(tmp_path, mode):
    """A CPU int8 / int4 directory on CUDA: torchao's int8 weights hold exactly the saved values and row scales;
    tinygemm's int4 weights hold them with the scales rounded to bf16 (checked GEMM by GEMM against the saved
    values, and through the whole model against the CPU model)."""
    from dia_fast.ops.reference import unpack_int4

    cpu = DiaTTS.random("tiny", seed=0, quantize=mode)
    directory = cpu.save_pretrained(tmp_path / "q")
    with cpu_tinygemm():
        model = _load_saved_as_torchao(directory)
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
        for name in target_names(model):
            saved, weight = cpu.model.get_submodule(name), model.get_submodule(name).weight
            if isinstance(saved, Int4Linear):
                assert type(weight).__name__ == "Int4TilePackedTo4dTensor", name
                scale = saved.weight_scale.bfloat16().float().repeat_interleave(saved.group, dim=1)
                want = x[:, : saved.in_features] @ (unpack_int4(saved.weight_int4).float() * scale).T
                got = torch.nn.functional.linear(x[:, : saved.in_features].bfloat16(), weight).float()
                assert float((got - want).norm() / want.norm()) < 0.01, name
            else:
                assert type(weight).__name__ == "Int8Tensor", name
                assert torch.equal(weight.qdata, saved.weight_int8)
                assert torch.equal(weight.scale.reshape(-1), saved.weight_scale)
        g = torch.Generator().manual_seed(0)
        ids, mask = torch.randint(1, 200, (1, 20), generator=g), torch.ones(1, 20, dtype=torch.bool)
        codes = torch.randint(0, 1024, (1, 12, 9), generator=g)
        got, want = model(ids, mask, codes).float(), cpu.model(ids, mask, codes)
    assert float((got - want).norm() / want.norm()) < 0.02  # bf16 against fp32
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9


def test_a_torchao_int8_model_saves_in_the_cpu_format_and_loads_back_on_the_cpu(tmp_path):
    """CUDA's int8 (torchao's int8 weights: int8 values with a row scale, no zero point) saves as dia_fast's int8
    directory, which the CPU loads as it is."""
    tts = DiaTTS.random("tiny", seed=0, dtype=torch.bfloat16)
    quantize_cuda(tts.model, gemm_kinds(tts.model, "int8", PARTS, INT4_PARTS), int8_kernel="torchao")
    tts.model._dia_fast_quantized = "int8"  # what quantize_decoder sets (its torchao branch runs on CUDA only)
    directory = tts.save_pretrained(tmp_path / "q")
    back = DiaTTS.from_pretrained(directory, device="cpu", codec=tts.codec)
    for name in target_names(back.model):
        layer, weight = back.model.get_submodule(name), tts.model.get_submodule(name).weight
        assert torch.equal(layer.weight_int8, weight.qdata)
        assert torch.equal(layer.weight_scale, weight.scale.reshape(-1))


FORMATS = {"fp8": "dia_fast.fp8-weight-only/1", "int4": "dia_fast.int4-zero-point-weight-only/1"}


@pytest.mark.parametrize("mode", ["fp8", "int4"])
def test_cuda_fp8_and_int4_models_save_and_load_back_with_the_same_weights(tmp_path, mode):
    """CUDA fp8 and int4 (torchao's weights, int4 with zero points) save a directory that loads back on CUDA with
    the same weights: every GEMM's saved values, dequantized by the format's formula, are the weight torchao
    quantized (its ``dequantize()``; tinygemm's has none, so its linear applied to the identity); the loaded model
    gives the same logits bit for bit. The CPU refuses the directory with a one-line error (no CPU kernel for
    either)."""
    from safetensors.torch import load_file

    from dia_fast.quantized_dir import read_quantization

    tts = DiaTTS.random("tiny", seed=0, dtype=torch.bfloat16)
    with cpu_tinygemm():
        quantize_cuda(tts.model, gemm_kinds(tts.model, mode, PARTS, INT4_PARTS), int8_kernel="torchao")
        tts.model._dia_fast_quantized = mode  # what quantize_decoder sets (its torchao branch runs on CUDA only)
        directory = tts.save_pretrained(tmp_path / "q")
        doc, saved = read_quantization(directory), load_file(str(directory / "model.safetensors"))
        assert doc["format"] == FORMATS[mode] and doc["mode"] == mode
        assert set(doc["quantized"]) == set(target_names(tts.model))
        for name in doc["quantized"]:
            weight = tts.model.get_submodule(name).weight
            if type(weight).__name__ == CLASSES["int4"]:
                want = torch.nn.functional.linear(torch.eye(weight.shape[1], dtype=torch.bfloat16), weight).T.float()
            else:
                want = weight.dequantize().float()
            if mode == "fp8":
                got = saved[f"{name}.weight_fp8"].float() * saved[f"{name}.weight_scale"][:, None]
            elif name in doc["int4"]:
                pairs, group = saved[f"{name}.weight_uint4"], doc["int4"][name]
                q = torch.stack([pairs >> 4, pairs & 0xF], dim=-1).reshape(pairs.shape[0], -1).float()
                scale, zero = (saved[f"{name}.weight_{n}"].repeat_interleave(group, dim=1) for n in ("scale", "zero"))
                got = (q - 8) * scale + zero
                assert type(weight).__name__ == CLASSES["int4"] and ".mlp." in name
            else:
                got = saved[f"{name}.weight_int8"].float() * saved[f"{name}.weight_scale"][:, None]
            torch.testing.assert_close(got.bfloat16().float(), want, rtol=0, atol=0, msg=name)  # bf16 weights
        model = _load_saved_as_torchao(directory)
        for name in doc["quantized"]:
            assert type(model.get_submodule(name).weight) is type(tts.model.get_submodule(name).weight), name
        g = torch.Generator().manual_seed(0)
        ids, mask = torch.randint(1, 200, (1, 20), generator=g), torch.ones(1, 20, dtype=torch.bool)
        codes = torch.randint(0, 1024, (1, 12, 9), generator=g)
        assert torch.equal(model(ids, mask, codes), tts.model(ids, mask, codes))
    with pytest.raises(ValueError, match=f"holds {mode} weights saved from CUDA .*which load on CUDA only; on cpu"):
        DiaTTS.from_pretrained(directory, device="cpu", codec=tts.codec)


def test_a_damaged_cuda_int4_directory_is_an_error_naming_the_gemm(tmp_path):
    """Missing zeros, zeros of the wrong shape and non-finite zeros are errors naming the GEMM, not a model that
    loads with garbage."""
    from safetensors.torch import load_file

    from dia_fast.config import DiaConfig
    from dia_fast.model import DiaModel
    from dia_fast.quantized_dir import load_saved, read_quantization

    tts = DiaTTS.random("tiny", seed=0, dtype=torch.bfloat16)
    with cpu_tinygemm():
        quantize_cuda(tts.model, gemm_kinds(tts.model, "int4", PARTS, INT4_PARTS), int8_kernel="torchao")
        tts.model._dia_fast_quantized = "int4"
        directory = tts.save_pretrained(tmp_path / "q")
    doc, state = read_quantization(directory), load_file(str(directory / "model.safetensors"))
    name = next(iter(doc["int4"]))
    zero = state[f"{name}.weight_zero"]
    n = re.escape(name)
    damaged = {
        f"the quantized weights of {n} are missing": {k: v for k, v in state.items() if k != f"{name}.weight_zero"},
        f"{n} must be torch.uint8 .* scales and zeros, got .* and zeros \\(1,": {
            **state,
            f"{name}.weight_zero": zero[:1].contiguous(),
        },
        f"the zeros of {n} must be finite": {**state, f"{name}.weight_zero": torch.full_like(zero, float("nan"))},
    }
    for match, tensors in damaged.items():
        with torch.device("meta"):
            model = DiaModel(DiaConfig.from_json(directory / "config.json"))
        with pytest.raises(ValueError, match=match):
            load_saved(model, dict(tensors), doc, str(directory))
    in_features = tts.model.get_submodule(name).weight.shape[1]
    for group in (48, 512):  # not a tinygemm group / does not divide the row
        with torch.device("meta"):
            model = DiaModel(DiaConfig.from_json(directory / "config.json"))
        bad = {**doc, "int4": {**doc["int4"], name: group}}
        with pytest.raises(ValueError, match=f"{n}: int4 group {group} must divide its {in_features} columns"):
            load_saved(model, dict(state), bad, str(directory))


@pytest.mark.parametrize(("out_features", "in_features"), [(384, 256), (200, 64), (9, 96), (1028, 2048)])
def test_tinygemm_weights_read_back_exactly_at_every_shape(out_features, in_features):
    """A tinygemm int4 weight read back through its kernel (values, scales, zeros) and packed again multiplies
    exactly as the original: ragged rows (padded to 8), columns padded to 1024, groups of 32 to 128, and more than
    one 1024-column read."""
    from dia_fast.quantized_dir import _tinygemm_groups, _tinygemm_weight, _unpair

    with cpu_tinygemm():
        weight = torchao_quantized(_linear(out_features, in_features), "int4").weight
        pairs, scale, zero, group = _tinygemm_groups(weight)
        assert pairs.shape == (out_features, in_features // 2) and scale.shape == (out_features, in_features // group)
        assert int(_unpair(pairs).max()) <= 15
        again = _tinygemm_weight(_unpair(pairs), scale, zero, group, torch.device("cpu"))
        x = torch.randn(5, in_features, generator=torch.Generator().manual_seed(1)).bfloat16()
        assert torch.equal(torch.nn.functional.linear(x, again), torch.nn.functional.linear(x, weight))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cuda_int8_can_run_on_dia_fasts_own_layer_and_triton_kernel(tmp_path, mode):
    """``int8_kernel="dia_fast"``: CUDA's int8 GEMMs become Int8Linear (the CPU's layer and format), whose op runs
    the Triton kernel on CUDA; int4 mode keeps tinygemm for the MLP. Quantizing after loading and while loading
    give the same model; the Triton kernel (here in the interpreter, fp32) gives the reference's logits."""
    import dia_fast.checkpoint as ckpt
    from dia_fast import ops
    from dia_fast.api import _finish_model
    from dia_fast.model import DiaModel
    from dia_fast.model.int8 import Int8Linear

    dtype = torch.bfloat16 if mode == "int4" else torch.float32  # tinygemm needs bf16; fp32 is exact in the interpreter
    full = DiaTTS.random("tiny", seed=3, dtype=dtype)
    want = copy.deepcopy(full.model)
    with cpu_tinygemm():
        quantize_cuda(want, gemm_kinds(want, mode, PARTS, INT4_PARTS), int8_kernel="dia_fast")
        for name, kind in gemm_kinds(want, mode, PARTS, INT4_PARTS).items():
            layer = want.get_submodule(name)
            assert isinstance(layer, Int8Linear) if kind == "int8" else type(layer.weight).__name__ == CLASSES[kind]
        cfg, tensors, _ = ckpt.load_config_and_tensors(full.save_pretrained(tmp_path / "m"), None)
        with torch.device("meta"):
            model = DiaModel(cfg)
        load_cuda_quantized(model, tensors, mode, dtype, torch.device("cpu"), "test", int8_kernel="dia_fast")
        model = _finish_model(model, torch.device("cpu"), dtype)
        g = torch.Generator().manual_seed(0)
        ids, mask = torch.randint(1, 200, (1, 20), generator=g), torch.ones(1, 20, dtype=torch.bool)
        codes = torch.randint(0, 1024, (1, 12, 9), generator=g)
        assert torch.equal(model(ids, mask, codes), want(ids, mask, codes))
        if mode == "int8":
            cpp_logits = want(ids, mask, codes)  # the CPU's C++ kernel
            ops.set_backend("triton", "int8_linear")
            try:
                assert ops.select_backend("int8_linear", "cpu") == "triton"  # the interpreter, not a fallback
                triton_logits = want(ids, mask, codes)
            finally:
                ops.set_backend(None, "int8_linear")
            torch.testing.assert_close(triton_logits, cpp_logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="int8_kernel must be one of torchao, dia_fast, got 'cutlass'"):
        quantize_cuda(want, {"decoder.logits_dense": "int8"}, int8_kernel="cutlass")


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("mode", "max_error", "int8_kernel"),
    [("int8", 0.015, "torchao"), ("int8", 0.015, "dia_fast"), ("fp8", 0.05, None), ("int4", 0.03, "torchao")],
)
def test_gpu_modes_generate_with_cuda_graphs_as_eagerly_and_keep_the_quality(mode, max_error, int8_kernel):
    """On CUDA, torchao's own kernels (tinygemm for int4) or dia_fast's Triton int8: the quality bound of the CPU
    runs above, and a CUDA-graphed greedy generation equal to an eager one on the same quantized weights."""
    from dia_fast.generation.engine import DecodeEngine
    from dia_fast.generation.generate import generate_codes
    from dia_fast.generation.sampling import SamplingConfig
    from dia_fast.model.int8 import Int8Linear
    from dia_fast.quantize import quantize_decoder
    from dia_fast.text import encode_batch

    ref = DiaTTS.random("tiny", seed=0, device="cuda", dtype=torch.bfloat16)
    quant = DiaTTS(copy.deepcopy(ref.model), ref.codec)
    quantize_decoder(quant.model, mode, int8_kernel=int8_kernel)
    kinds = gemm_kinds(ref.model, mode, PARTS, INT4_PARTS)
    for name, kind in kinds.items():
        layer = quant.model.get_submodule(name)
        if int8_kernel == "dia_fast":
            assert isinstance(layer, Int8Linear) and layer.weight_int8.is_cuda, name
        else:
            assert type(layer.weight).__name__ == CLASSES[kind], name
    quality = quantization_quality(ref, quant, steps=200)
    assert 1e-4 < quality["rel_logit_error"] < max_error, quality  # (> 0: the quantized model was measured)
    ids, mask = encode_batch(["[S1] Hello there.", "[S2] And you?"], pad_to_multiple=128)
    ids, mask = ids.cuda(), mask.cuda()
    model = quant.model
    kw = dict(max_new_tokens=48, sampling=SamplingConfig(do_sample=False))
    eager = generate_codes(model, ids, mask, engine=DecodeEngine(model, static=True, cuda_graphs=False), **kw)
    graphed = generate_codes(model, ids, mask, engine=DecodeEngine(model), **kw)
    assert graphed.cuda_graphs and not eager.cuda_graphs
    assert torch.equal(graphed.delayed, eager.delayed)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_loading_quantizes_tensor_by_tensor_on_the_device(tmp_path, mode):
    """from_pretrained(quantize=) on CUDA gives the model that quantizing after a full-precision load gives, with at
    most one GEMM in full precision at a time: the peak above the loaded model stays within what quantizing the
    largest GEMM alone takes (measured here: torchao's temporaries are several times the weight) plus its gathered
    bf16 weight. Loading every GEMM first and then quantizing would hold all their bf16 bytes at once: about 250 MiB
    more than that at 4 layers (564 MiB of bf16 GEMMs, half of it left after int8)."""
    from dia_fast.config import DiaConfig
    from dia_fast.quantize import cuda_layer

    cfg = DiaConfig.preset("dia-1.6b").with_layers(1, 4)
    src = DiaTTS.random(cfg, seed=0, device="cpu", dtype=torch.bfloat16)
    directory = src.save_pretrained(tmp_path / "m")
    largest = src.model.decoder.layers[0].mlp.gate_up_proj.weight  # [16384, 2048]: the largest GEMM
    one_gemm = 0
    for kind in set(gemm_kinds(src.model, mode, PARTS, INT4_PARTS).values()):
        lin = torch.nn.Linear(largest.shape[1], largest.shape[0], bias=False, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        layer = cuda_layer(lin, kind)
        one_gemm = max(one_gemm, torch.cuda.max_memory_allocated() - start)
        del lin, layer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q = DiaTTS.from_pretrained(directory, device="cuda", dtype=torch.bfloat16, codec=src.codec, quantize=mode)
    peak, after = torch.cuda.max_memory_allocated() - base, torch.cuda.memory_allocated() - base
    bound = one_gemm + largest.numel() * 2 + (32 << 20)
    assert after < weight_bytes(src.model) and peak - after < bound, (peak, after, one_gemm, bound)
    want = DiaTTS.random(cfg, seed=0, device="cuda", dtype=torch.bfloat16, quantize=mode)
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(1, 200, (1, 20), generator=g).cuda(), torch.ones(1, 20, dtype=torch.bool).cuda()
    codes = torch.randint(0, 1024, (1, 12, 9), generator=g).cuda()
    with torch.inference_mode():
        assert torch.equal(q.model(ids, mask, codes), want.model(ids, mask, codes))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_saved_directories_load_across_devices(tmp_path, monkeypatch, mode):
    """A CPU-saved directory loads on CUDA (tinygemm / dia_fast's or torchao's int8 with the saved values), and a
    CUDA int8 model of either int8 kernel saves a directory that the CPU loads as it is."""
    import dia_fast.quantize

    cpu = DiaTTS.random("tiny", seed=0, device="cpu", quantize=mode)  # (the default device here is CUDA)
    gpu = DiaTTS.from_pretrained(cpu.save_pretrained(tmp_path / "cpu"), device="cuda", codec=cpu.codec)
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(1, 200, (1, 20), generator=g), torch.ones(1, 20, dtype=torch.bool)
    codes = torch.randint(0, 1024, (1, 12, 9), generator=g)
    with torch.inference_mode():
        want = cpu.model(ids, mask, codes)
        got = gpu.model(ids.cuda(), mask.cuda(), codes.cuda()).float().cpu()
    assert float((got - want).norm() / want.norm()) < 0.02  # bf16 on the GPU against fp32 on the CPU
    for kernel in dia_fast.quantize.CUDA_INT8_KERNELS if mode == "int8" else ():
        monkeypatch.setattr(dia_fast.quantize, "CUDA_INT8_KERNEL", kernel)
        cuda_int8 = DiaTTS.random("tiny", seed=0, device="cuda", dtype=torch.bfloat16, quantize="int8")
        back = DiaTTS.from_pretrained(cuda_int8.save_pretrained(tmp_path / kernel), device="cpu", codec=cpu.codec)
        layer = cuda_int8.model.decoder.logits_dense
        saved = layer.weight_int8 if kernel == "dia_fast" else layer.weight.qdata
        assert torch.equal(back.model.decoder.logits_dense.weight_int8, saved.cpu()), kernel


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["int8", "fp8", "int4"])
def test_gpu_models_of_every_mode_save_and_load_back_on_cuda_as_they_were(tmp_path, mode):
    """A CUDA model of each mode saves a directory that loads back on CUDA with the same logits, bit for bit
    (int8: the dia_fast int8 format; fp8 and int4: the CUDA-only formats)."""
    if mode == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    tts = DiaTTS.random("tiny", seed=0, device="cuda", dtype=torch.bfloat16, quantize=mode)
    back = DiaTTS.from_pretrained(tts.save_pretrained(tmp_path / "q"), device="cuda", codec=tts.codec)
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(1, 200, (1, 20), generator=g).cuda(), torch.ones(1, 20, dtype=torch.bool).cuda()
    codes = torch.randint(0, 1024, (1, 12, 9), generator=g).cuda()
    with torch.inference_mode():
        assert torch.equal(back.model(ids, mask, codes), tts.model(ids, mask, codes))

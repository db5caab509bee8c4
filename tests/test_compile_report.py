"""Every Triton kernel compiles for Hopper (sm_90a) at the launch configurations dia_fast really uses at
Dia-1.6B shapes, with no register spills and within an H100's shared memory per block; no GPU needed.

The launches are recorded from the public code paths by :mod:`dia_fast.bench.compile_report` (not listed
here), so a new kernel is covered as soon as the code launches it, and the coverage test fails if a
``*_kernel`` of a ``dia_fast.ops.triton_*`` module is never launched.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dia_fast.ops as ops
from dia_fast.bench import main as bench_main
from dia_fast.bench.compile_report import compile_report, parse_arch

pytest.importorskip("triton.backends.nvidia")

OPS_DIR = Path(ops.__file__).parent
H100_SMEM_PER_BLOCK = 232448  # 227 KiB: cudaDevAttrMaxSharedMemoryPerBlockOptin of an H100
MAX_REGISTERS = 255  # per thread, any NVIDIA GPU since Kepler


@pytest.fixture(scope="module")
def report() -> list[dict]:
    return compile_report("sm_90")  # memoised: the CLI test below reuses it


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) in ("triton.jit", "jit")


def defined_kernels() -> set[tuple[str, str]]:
    """(module, name) of every ``@triton.jit`` function named ``*_kernel`` in dia_fast/ops/triton_*.py, read from
    the sources (not from the report)."""
    found = set()
    for path in sorted(OPS_DIR.glob("triton_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any(_is_triton_jit(d) for d in node.decorator_list):
                    found.add((f"dia_fast.ops.{path.stem}", node.name))
    return found


def problems(report: list[dict]) -> list[str]:
    """What breaks the rules on an H100: compile errors, spills, too much shared memory, impossible registers."""
    found = []
    for r in report:
        what = f"{r['kernel']} {r['constexprs']} warps={r['num_warps']} stages={r['num_stages']} grids={r['grids']}"
        if not r["compiled"]:
            found.append(f"{what}: does not compile: ...{r['error'][-600:]}")
            continue
        if r["spill_store_bytes"] or r["spill_load_bytes"]:
            found.append(f"{what}: spills {r['spill_store_bytes']} B stored / {r['spill_load_bytes']} B loaded")
        if r["shared_bytes"] > H100_SMEM_PER_BLOCK:
            found.append(f"{what}: {r['shared_bytes']} B of shared memory > {H100_SMEM_PER_BLOCK}")
        if not 0 < r["registers"] <= MAX_REGISTERS:
            found.append(f"{what}: {r['registers']} registers")
    return found


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills(report: list[dict]) -> None:
    assert report, "no Triton launch was recorded"
    for r in report:
        assert r["arch"] == "sm_90a" and r["launches"] >= 1
        assert all(len(g) == 3 and min(g) >= 1 for g in r["grids"])
        if r["compiled"]:
            assert r["shared_bytes"] == r["shared_static_bytes"] + r["shared_dynamic_bytes"]
    found = problems(report)
    assert not found, "\n".join(found)


@pytest.mark.slow
def test_every_kernel_is_in_the_report(report: list[dict]) -> None:
    defined = defined_kernels()
    assert ("dia_fast.ops.triton_attention", "_attn_fwd_kernel") in defined  # the discovery itself works
    recorded = {(r["module"], r["kernel"]) for r in report}
    missing = sorted(defined - recorded)
    assert not missing, f"kernels never launched by the compile report's scenarios: {missing}"
    misnamed = sorted(k for k in recorded if not k[1].endswith("_kernel"))
    assert not misnamed, f"launched kernels must be named *_kernel: {misnamed}"
    scenarios = {s for r in report for s in r["scenarios"]}
    assert any(s.startswith("b1 ") for s in scenarios) and any(s.startswith("b8 ") for s in scenarios)


@pytest.mark.slow
def test_the_report_compiles_the_supported_edges(report: list[dict]) -> None:
    """Configurations the generations do not reach are compiled too (and so held to no spills): the slot step at
    every max_slots bucket up to 128 (one warp spilled from 32 slots), fp32 decode attention at Dia's head dim and
    prefill attention at head dim 256."""

    def rows(kernel: str, scenario: str) -> list[dict]:
        return [r for r in report if r["kernel"] == kernel and any(s.startswith(scenario) for s in r["scenarios"])]

    assert {r["constexprs"]["BLOCK_S"] for r in rows("_slot_update_kernel", "ops: slot_update")} == {32, 64, 128}
    decode = rows("_decode_kernel", "ops: decode_attention fp32")
    assert [r["constexprs"]["HEAD_DIM"] for r in decode] == [128]
    prefill = rows("_attn_fwd_kernel", "ops: attention, head_dim 256")
    assert [r["constexprs"]["HEAD_DIM"] for r in prefill] == [256]


@pytest.mark.slow
def test_cli_writes_json_and_table(report: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as caught:  # a --json in a missing directory: refused before the report runs
        bench_main(["--compile-report", "--json", str(tmp_path / "missing" / "report.json")])
    assert caught.value.code == 2 and "directory does not exist" in capsys.readouterr().err
    out = tmp_path / "report.json"
    assert bench_main(["--compile-report", "--arch", "sm_90", "--json", str(out)]) == 0
    assert json.loads(out.read_text()) == report
    printed = capsys.readouterr().out
    assert "regs" in printed and "spill st/ld" in printed
    assert all(r["kernel"] in printed for r in report)
    strict = bench_main(["--compile-report", "--arch", "sm_90a", "--quiet", "--strict", "--json", str(out)])
    assert strict == (1 if problems(report) else 0)
    assert capsys.readouterr().out == ""
    assert bench_main(["--compile-report", "--arch", "sm_75", "--quiet"]) == 2
    assert "unknown architecture" in capsys.readouterr().err
    # the report ran in a child process: this one's kernels still run in the interpreter
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1"
        codes = torch.randint(0, 1024, (2, 40, 9))
        pattern = [0, 8, 9, 10, 11, 12, 13, 14, 15]
        got = ops.undelay_codes(codes, pattern, backend="triton")
        assert torch.equal(got, ops.undelay_codes(codes, pattern, backend="torch"))


def test_parse_arch() -> None:
    assert parse_arch("sm_90").target_name == "sm_90a"
    assert parse_arch("sm_90a") == parse_arch("90") == parse_arch(90)
    assert parse_arch("sm_80").target_name == "sm_80"
    assert parse_arch("sm_90", sm_count=114).sm_count == 114
    with pytest.raises(ValueError, match="unknown architecture"):
        parse_arch("sm_75")


_RECORDER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import triton
    import triton.language as tl
    from dia_fast.bench.compile_report import _AsCuda, _describe, _Recorder, _recording, parse_arch

    @triton.jit
    def toy_kernel(X, Y, n, one, m, scale, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(Y + i, tl.load(X + i, mask=i < n + one + m) * scale, mask=i < n)

    arch = parse_arch("sm_90")
    rec = _Recorder(arch)
    x = torch.zeros(64, dtype=torch.bfloat16)
    with _recording(rec), _AsCuda(arch):
        seen = {
            "device": str(x.device),
            "is_cuda": x.is_cuda,
            "get_device": x.get_device(),
            "sms": torch.cuda.get_device_properties(x.device).multi_processor_count,
            "new_tensor": str(torch.empty(3, device=x.device).device),
        }
        toy_kernel[(3, 2)](x, x[1:], 33, 1, 32, 0.5, BLOCK=64, num_warps=2)
    seen["device_after"] = str(x.device)
    print(json.dumps({"seen": seen, "row": _describe(rec.launches, arch)}))
    """
)


def test_recorder_specialises_like_triton_and_shows_a_gpu(tmp_path: Path) -> None:
    """The recording mechanism on a toy kernel (Triton's rules: ints equal to 1 become constants, ints
    divisible by 16 and 16-byte aligned pointers get the divisibility attribute; floats are not specialised),
    and what the host code sees inside: an sm_90 GPU with 132 SMs; outside, the tensors are CPU tensors."""
    script = tmp_path / "toy_record.py"
    script.write_text(_RECORDER_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["seen"] == {
        "device": "cuda:0",
        "is_cuda": True,
        "get_device": 0,
        "sms": 132,
        "new_tensor": "cuda:0",  # allocated on the CPU, and seen as cuda:0 inside
        "device_after": "cpu",
    }
    row = doc["row"]
    assert row["kernel"] == "toy_kernel" and row["num_warps"] == 2 and row["launches"] == 1
    assert row["grids"] == [[3, 2, 1]]
    assert row["constexprs"] == {"BLOCK": 64}
    assert row["equal_to_1"] == ["one"]
    assert row["signature"] == {"X": "*bf16", "Y": "*bf16", "n": "i32", "m": "i32", "scale": "fp32"}
    assert row["divisible_by_16"] == ["m"]
    assert row["aligned_16"] == ["X"]  # x[1:] of bf16 starts 2 bytes in
    assert row["not_16"] == ["Y", "n"]

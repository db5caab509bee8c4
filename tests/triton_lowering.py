"""Triton's GPU compiler front end on a machine without a GPU: kernels lowered to Triton IR for sm_90."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_LOWER_SCRIPT = """
import importlib, json, sys
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
options = backend.parse_options({"num_warps": 8})
n = 0
for module, kernel, types, constexprs in json.load(sys.stdin):
    fn = getattr(importlib.import_module(module), kernel)
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    ttir = src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    assert "tt.func" in str(ttir)
    n += 1
print("lowered", n, flush=True)
"""


def lower_for_cuda(cases: list[tuple[str, str, dict[str, str], dict[str, object]]]) -> int:
    """Run the GPU compiler's front end (Python AST -> Triton IR, for an sm_90 target) on each
    ``(module, kernel, arg types, constexprs)``, in a subprocess without the interpreter: the
    interpreter runs kernels as Python and misses errors only the compiler reports (constexpr
    misuse, runtime ints that Triton turns into constants when they equal 1, type errors). Returns how
    many cases lowered."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "python"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _LOWER_SCRIPT], input=json.dumps(cases), env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and "lowered" in proc.stdout, proc.stderr[-4000:]
    return int(proc.stdout.split("lowered")[-1])

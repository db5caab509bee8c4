"""``dia_fast.info()`` and the extension fallback: missing, disabled, foreign and stale ``_C``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import dia_fast
from dia_fast import _ext, ops

PKG = Path(dia_fast.__file__).resolve().parent

# Runs in a subprocess: import, report, and run a delay op on the CPU through the dispatcher.
# An editable install (scikit-build-core) puts a finder in front of sys.meta_path that maps
# `dia_fast` to the source tree and its built _C whatever PYTHONPATH says: drop it, so that the
# package copy on PYTHONPATH is the one imported.
_PROBE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
import json, torch, dia_fast
from dia_fast import ops
i = dia_fast.info()
codes = torch.arange(12).reshape(1, 4, 3)
ok = torch.equal(ops.apply_delay(codes, [0, 1, 2], 9, 8), ops.reference.apply_delay(codes, [0, 1, 2], 9, 8))
assert dia_fast.__file__.startswith(sys.argv[1]), (dia_fast.__file__, sys.argv[1])
print(json.dumps({"extension": i["extension"], "cpu": {op: d["cpu"] for op, d in i["backends"].items()}, "ok": ok}))
"""


def _probe(pythonpath: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIA_FAST_") and k != "TRITON_INTERPRET"}
    clean.update(PYTHONPATH=str(pythonpath), OMP_NUM_THREADS="1", **env)
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, str(pythonpath)], env=clean, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_info_reports_everything():
    info = dia_fast.info()
    assert info["version"] == dia_fast.__version__
    assert info["torch"] == torch.__version__
    assert info["quantize"] == {
        "cpu": ["int8", "int4"],
        "cuda": ["int8", "fp8", "int4"],
        "cuda_int8_kernel": "dia_fast",
    }
    assert "torchao" in info  # its version, or None where it is not installed
    assert "triton" in info and info["device"] in ("cpu", "cuda", "mps")
    ext = info["extension"]
    assert ext["loaded"] == _ext.loaded()
    if _ext.loaded():
        assert ext["reason"] == "ok" and ext["build"]["abi_version"] == _ext.ABI_VERSION
    else:
        assert ext["reason"] == _ext.why_not() and ext["build"] is None
    table = info["backends"]
    assert set(table) >= {"apply_delay", "revert_delay", "undelay_codes", "cfg_sample", "decode_attention"}
    for op, per_device in table.items():
        assert set(per_device) == {"cpu", "cuda", "mps"}
        for device, backend in per_device.items():
            assert backend == ops.select_backend(op, device)
            assert ops.backend_available(backend, device)[0]
    assert info["backends"]["decode_attention"]["mps"] in ("metal", "torch")
    assert set(info["backend_availability"]) == set(ops.BACKENDS)
    json.dumps(info)  # plain data


@pytest.fixture(scope="module")
def pkg_copy(tmp_path_factory) -> Path:
    """A copy of the Python package without any compiled extension."""
    root = tmp_path_factory.mktemp("pkg")
    shutil.copytree(PKG, root / "dia_fast", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    return root


def test_missing_extension_falls_back(pkg_copy):
    out = _probe(pkg_copy)
    assert out["ok"] and out["extension"]["loaded"] is False
    assert out["extension"]["reason"].startswith("not built")
    assert set(out["cpu"].values()) == {"torch"}


def test_disabled_extension_falls_back():
    out = _probe(PKG.parent, DIA_FAST_DISABLE_EXT="1")
    assert out["ok"] and out["extension"]["loaded"] is False
    assert "DIA_FAST_DISABLE_EXT" in out["extension"]["reason"]
    assert set(out["cpu"].values()) == {"torch"}


def test_backend_environment_variable():
    """DIA_FAST_BACKEND=torch forces the references; an unknown value warns and is ignored (never a broken import)."""
    assert set(_probe(PKG.parent, DIA_FAST_BACKEND="torch")["cpu"].values()) == {"torch"}
    default = _probe(PKG.parent)["cpu"]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DIA_FAST_")}
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, str(PKG.parent)],
        env={**clean, "PYTHONPATH": str(PKG.parent), "OMP_NUM_THREADS": "1", "DIA_FAST_BACKEND": "bogus"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "DIA_FAST_BACKEND='bogus' is not one of" in res.stderr, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["cpu"] == default


def test_foreign_binary_falls_back(pkg_copy, tmp_path):
    root = tmp_path / "foreign"
    shutil.copytree(pkg_copy, root)
    # a file with this interpreter's extension suffix that is not a loadable library for it
    (root / "dia_fast" / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"\x7fELF not really")
    out = _probe(root)
    assert out["ok"] and out["extension"]["loaded"] is False
    assert out["extension"]["reason"].startswith("ImportError")


def test_stale_extension_falls_back(pkg_copy, tmp_path):
    root = tmp_path / "stale"
    shutil.copytree(pkg_copy, root)
    (root / "dia_fast" / "_C.py").write_text("def abi_version():\n    return 1\n")
    out = _probe(root)
    assert out["ok"] and out["extension"]["loaded"] is False
    assert out["extension"]["reason"].startswith("stale extension: ABI 1")
    assert set(out["cpu"].values()) == {"torch"}


def test_reload_honours_disable(monkeypatch):
    was = _ext.loaded()
    monkeypatch.setenv("DIA_FAST_DISABLE_EXT", "1")
    try:
        assert _ext.reload() is False and "DIA_FAST_DISABLE_EXT" in _ext.why_not()
        assert ops.select_backend("apply_delay", "cpu") == "torch"
    finally:
        monkeypatch.delenv("DIA_FAST_DISABLE_EXT")
        assert _ext.reload() is was


def test_a_choice_made_across_set_backend_is_not_remembered(monkeypatch):
    """A selection that started before ``set_backend`` (another thread's) and ended after it must not be kept: later
    calls would go on using the old backend although the override says otherwise."""
    from dia_fast.ops import _dispatch

    real_select = _dispatch._select

    def select_racing_set_backend(op: str, device_type: str) -> str:
        chosen = real_select(op, device_type)  # the choice before the override...
        ops.set_backend("torch")  # ...and the override, made while this selection was running
        return chosen

    _dispatch.invalidate()
    monkeypatch.setattr(_dispatch, "_select", select_racing_set_backend)
    try:
        ops.select_backend("apply_delay", "cpu")
        monkeypatch.setattr(_dispatch, "_select", real_select)
        assert ops.select_backend("apply_delay", "cpu") == "torch"
    finally:
        ops.set_backend(None)

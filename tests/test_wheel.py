"""Build the wheel, install it into a fresh virtual environment and run it from outside the tree.

Two wheels: the normal one (must contain ``dia_fast/_C*.so`` and report the extension loaded)
and one built with ``DIA_FAST_NO_EXT=1`` (no extension; everything runs on the PyTorch path).
Both are built from a copy of the working tree's tracked and unignored files (what a clean clone
has, plus uncommitted edits), offline, with the build tools already installed
(``--no-build-isolation``). About 1-2 minutes on 2 cores; deselect with ``-m "not wheel"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.wheel

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
    return res.stdout


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIA_FAST_", "PYTHON")) and k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    if shutil.which("cmake") is None:
        pytest.skip("needs cmake")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    dst = tmp_path_factory.mktemp("src")
    for rel in filter(None, files):
        src = ROOT / os.fsdecode(rel)
        if src.is_file():  # listed but deleted in the working tree: skip
            (dst / os.fsdecode(rel)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / os.fsdecode(rel))
    return dst


def _build_wheel(src: Path, out: Path, **env: str) -> Path:
    _run(
        [sys.executable, "-m", "pip", "wheel", ".", "-w", str(out), "--no-deps", "--no-build-isolation", "-q"],
        cwd=src, env=_clean_env(**env), timeout=600,
    )  # fmt: skip
    wheels = list(out.glob("dia_fast-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _venv_with_wheel(where: Path, wheel: Path) -> Path:
    """A fresh venv that sees this interpreter's packages (torch, numpy, ...) and has the wheel installed.

    Instead of ``--system-site-packages``, the venv gets a .pth line naming this interpreter's
    site-packages: its packages are importable, but its .pth hooks are not run, so an editable
    install of dia_fast there (what CI does) cannot shadow the wheel.
    """
    venv.create(where, with_pip=False, symlinks=os.name != "nt")
    py = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=where).strip())
    dirs = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "_dia_fast_test_base.pth").write_text("".join(f"{d}\n" for d in dirs))
    _run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=where, env=_clean_env(),
    )  # fmt: skip
    return py


_INFO = (
    "import json, dia_fast; i = dia_fast.info(); "
    "print(json.dumps({'file': dia_fast.__file__, 'version': i['version'], 'extension': i['extension'], "
    "'backends': i['backends']}))"
)


def _smoke(py: Path, cwd: Path) -> dict:
    info = json.loads(_run([str(py), "-c", _INFO], cwd=cwd, env=_clean_env()).strip().splitlines()[-1])
    assert Path(info["file"]).resolve().is_relative_to(py.parent.parent.resolve()), info["file"]
    out = cwd / "x.wav"
    _run([str(py), "-m", "dia_fast", "[S1] Hi.", "--out", str(out), "--max-new-tokens", "40", "--no-progress"],
         cwd=cwd, env=_clean_env(OMP_NUM_THREADS="2"))  # fmt: skip
    assert out.is_file() and out.stat().st_size > 44  # a WAV header and samples
    return info


def _dist_info(wheel: Path) -> str:
    name, version = wheel.name.split("-")[:2]
    return f"{name}-{version}.dist-info"


def _check_cli_exists(src: Path) -> None:
    if not (src / "python" / "dia_fast" / "__main__.py").is_file():
        pytest.skip("dia_fast/__main__.py (the CLI) does not exist yet")


def test_wheel_with_extension(source_copy, tmp_path):
    _check_cli_exists(source_copy)
    wheel = _build_wheel(source_copy, tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("dia_fast/_C") and n.endswith((".so", ".pyd")) for n in names), names
    assert {"dia_fast/kernels/delay.metal", "dia_fast/kernels/cfg_sample.metal"} <= set(names)
    assert _dist_info(wheel) + "/licenses/LICENSE" in names
    py = _venv_with_wheel(tmp_path / "venv", wheel)
    info = _smoke(py, tmp_path)
    assert info["extension"]["loaded"] is True, info["extension"]
    assert info["extension"]["build"]["version"] == info["version"]
    assert info["backends"]["apply_delay"]["cpu"] == "cpp"


def test_wheel_without_extension(source_copy, tmp_path):
    _check_cli_exists(source_copy)
    wheel = _build_wheel(source_copy, tmp_path / "dist", DIA_FAST_NO_EXT="1")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # installs on any Python and platform
    assert "Root-Is-Purelib: true" in zipfile.ZipFile(wheel).read(_dist_info(wheel) + "/WHEEL").decode()
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("dia_fast/_C") for n in names), names
    assert "dia_fast/kernels/delay.metal" in names  # the Metal sources ship either way
    assert _dist_info(wheel) + "/licenses/LICENSE" in names
    py = _venv_with_wheel(tmp_path / "venv", wheel)
    info = _smoke(py, tmp_path)
    assert info["extension"]["loaded"] is False
    assert "not built" in info["extension"]["reason"]
    assert set(info["backends"]["apply_delay"].values()) <= {"torch", "triton"}


def test_sdist_has_native_sources(source_copy, tmp_path):
    import tarfile

    out = tmp_path / "sdist"
    code = f"from scikit_build_core.build import build_sdist; print(build_sdist({str(out)!r}))"
    name = _run([sys.executable, "-c", code], cwd=source_copy, env=_clean_env()).strip().splitlines()[-1]
    with tarfile.open(out / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"CMakeLists.txt", "pyproject.toml", "LICENSE", "csrc/module.cpp", "csrc/kernels.hpp"} <= members
    assert {f"kernels/{n}" for n in ("delay.metal", "decode_attention.metal", "cfg_sample.metal")} <= members
    assert "python/dia_fast/_ext.py" in members
    assert not any(m.endswith((".so", ".pyd")) for m in members)

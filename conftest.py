"""Settings for tests/ and benchmarks/: offline hub, the Triton interpreter on CPU-only machines
(set before triton is imported), GPU/MPS-marked tests skipped without the device, a fixed seed; in CI
(``CI`` set) a test may skip only for what the machine lacks (a GPU, a CPU instruction set, ...): any other skip (a
test extra that does not import, the C++ extension not built) is a failure, since ``.[test]`` installs all of it (and
CI's machine has the C++ toolchain and cmake the build needs).

Benchmarks: ``PYTHONPATH=python python -m pytest benchmarks/ --benchmark-columns=mean,stddev,rounds``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: kernels then run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps is not None and mps.is_available())
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_mps = pytest.mark.skip(reason="needs an Apple GPU (mps)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "mps" in item.keywords and not has_mps:
            item.add_marker(skip_mps)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


_IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
# the only reasons a test may skip in CI: what the machine lacks (a GPU, an ISA, a compiler type, an OS feature)
_HARDWARE_SKIPS = (
    "needs a CUDA GPU",
    "needs an Apple GPU",
    "this CPU does not run ISA",
    "this g++ has no _Float16",
    "fp8 needs compute capability",
    "no named pipes here",
)


def _fail_skips_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (_IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not reason.startswith(_HARDWARE_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI ({reason}): there, only missing hardware may skip a test (CI sets CI=true)"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    _fail_skips_in_ci(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> pytest.CollectReport:
    report = yield
    _fail_skips_in_ci(report)
    return report

"""Benchmark-wide settings, as in tests/conftest.py: offline hub, Triton interpreter on CPU-only
machines (set before triton is imported), GPU/MPS markers that skip without the device.

Run: ``PYTHONPATH=python python -m pytest benchmarks/ --benchmark-columns=mean,stddev,rounds``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "gpu: needs a CUDA device (skipped without one)",
        "mps: needs an Apple GPU (skipped elsewhere)",
        "slow: full-size shapes",
    ):
        config.addinivalue_line("markers", line)


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

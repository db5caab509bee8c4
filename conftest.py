"""Settings for tests/ and benchmarks/: offline hub, the Triton interpreter on CPU-only machines
(set before triton is imported), GPU/MPS-marked tests skipped without the device, a fixed seed.

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

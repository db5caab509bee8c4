"""torchao's CUDA int4 tensors on the CPU, for tests and for measuring the CUDA modes' quality where no GPU is.

``quantize="int4"`` on CUDA uses torchao's ``Int4TilePackedTo4dTensor``, whose two kernels are PyTorch's tinygemm
ops ``aten._convert_weight_to_int4pack`` (pack) and ``aten._weight_int4pack_mm`` (GEMM), which have CUDA kernels
only. PyTorch's CPU has the same pair under ``..._for_cpu`` names, with the same arithmetic (``(q - 8) * scale +
zero`` per group of columns, bf16) and its own packing. :func:`cpu_tinygemm` registers the CPU pair as the CPU
kernels of the CUDA pair (``torch.library``, removed again on exit) and answers torchao's compute-capability
check, so everything torchao and dia_fast do around those two ops (choosing the scales and zeros, the packing's
padding, the loaders, the model's forward) runs here. What this cannot check is the CUDA kernels themselves: the GPU
check does (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _pack(packed_pairs: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """The CUDA op's input is uint8 [N, K / 2], column 2i in the high nibble and 2i + 1 in the low one; the CPU op's
    is int32 [N, K] with N a multiple of 16 (the CUDA op's: 8): padded here with zero rows, which :func:`_mm` gives
    zero scales and torchao slices off its output."""
    hi, lo = (packed_pairs >> 4).to(torch.int32), (packed_pairs & 0xF).to(torch.int32)
    values = torch.stack([hi, lo], dim=-1).reshape(packed_pairs.shape[0], -1)
    values = torch.nn.functional.pad(values, (0, 0, 0, -values.shape[0] % 16))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, inner_k_tiles)


def _mm(x: torch.Tensor, packed: torch.Tensor, group: int, scale_and_zeros: torch.Tensor) -> torch.Tensor:
    """scale_and_zeros: [K / group, N, 2], padded to the packed weight's rows."""
    extra = packed.shape[0] - scale_and_zeros.shape[1]
    scale_and_zeros = torch.nn.functional.pad(scale_and_zeros, (0, 0, 0, extra))
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scale_and_zeros)


@contextlib.contextmanager
def cpu_tinygemm() -> Iterator[None]:
    """Within: torchao's tinygemm int4 tensors quantize and run on the CPU (see the module doc)."""
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_convert_weight_to_int4pack", _pack, "CPU")
    lib.impl("_weight_int4pack_mm", _mm, "CPU")
    saved_capability = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda *_a, **_k: (9, 0)  # torchao asks before packing
    try:
        yield
    finally:
        lib._destroy()
        torch.cuda.get_device_capability = saved_capability

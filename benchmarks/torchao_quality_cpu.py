"""The CUDA quantization modes' quality (torchao int8 / fp8 / int4), measured on the CPU where no GPU is.

torchao's int8 and fp8 weight-only tensors run on the CPU as they are; int4 runs with the CPU's tinygemm ops
standing in for the CUDA ones (tests/torchao_cpu.py: same arithmetic, other packing). The model is bf16, as on a
GPU; the reference is the same bf16 model unquantized. Prints one JSON line per mode (the ``quality`` block of
``python -m dia_fast.bench --quantize``). From the repository root:

    python benchmarks/torchao_quality_cpu.py --model dia-1.6b --layers 2 --steps 200 --modes int8,fp8,int4,int4-all

``int4-all``: int4 on every GEMM, not only the MLP (what docs/quantization.md compares against).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.torchao_cpu import cpu_tinygemm  # noqa: E402

from dia_fast import DiaTTS  # noqa: E402
from dia_fast.bench.quality import quantization_quality  # noqa: E402
from dia_fast.config import DiaConfig  # noqa: E402
from dia_fast.quantize import INT4_PARTS, PARTS, gemm_kinds, quantize_cuda  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="encoder and decoder layers (default: the preset's)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--modes", default="int8,fp8,int4,int4-all")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = DiaConfig.preset(args.model)
    if args.layers:
        cfg = cfg.with_layers(args.layers, args.layers)
    ref = DiaTTS.random(cfg, seed=args.seed, dtype=torch.bfloat16)
    for mode in args.modes.split(","):
        quant = copy.deepcopy(ref)
        base = mode.removesuffix("-all")
        int4_parts = PARTS if mode.endswith("-all") else INT4_PARTS
        t0 = time.perf_counter()
        with cpu_tinygemm():
            quantize_cuda(quant.model, gemm_kinds(quant.model, base, PARTS, int4_parts))
            quality = quantization_quality(ref, quant, steps=args.steps)
        quality.update(mode=mode, model=args.model, layers=args.layers, seconds=round(time.perf_counter() - t0, 1))
        print(json.dumps(quality), flush=True)


if __name__ == "__main__":
    main()

"""CPU int8: float32 or bfloat16 activations? The measurement behind ``quantize=`` requiring a float32 model on
the CPU (docs/quantization.md, "Activations on the CPU").

The same random weights, one process, interleaved runs (the bench's ``DiaFastCase``, greedy):

* ``fp32``, ``bf16``: the unquantized model in each dtype (context: what bf16 buys without int8);
* ``int8-fp32``: ``quantize="int8"`` as shipped: float32 activations, the C++ int8 kernel;
* ``int8-bf16``: the same int8 weights in a bfloat16 model. The C++ kernel takes float32 rows, so each GEMM
  converts its bf16 input to fp32 and its output back (a few thousand values per step: the cheapest way to feed
  it); every other op runs in bf16 (the C++ layer ops are float32-only, so those fall back to PyTorch).

Each engine runs with CPU step graphs where they record (``cpu_graph=`` in the notes) and eagerly. Quality: the
teacher-forced logit error and top-1 agreement of both int8 models against the fp32 model
(``bench.quality.quantization_quality``). From the repository root:

    PYTHONPATH=python python benchmarks/cpu_activation_dtype.py --model dia-1.6b --layers 2 --steps 64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from dia_fast import DiaTTS, ops
from dia_fast.bench.quality import quantization_quality
from dia_fast.bench.runners import DiaFastCase
from dia_fast.config import DiaConfig
from dia_fast.generation.sampling import SamplingConfig
from dia_fast.ops import cpp
from dia_fast.quantize import quantize_decoder


def _int8_linear_any_dtype(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, out=None):  # noqa: ANN001, ANN202
    """The C++ int8 GEMM for bf16 rows too: converted to fp32 and back."""
    if x.dtype == torch.float32:
        return cpp.int8_linear(x, weight, scale, out=out)
    y = cpp.int8_linear(x.float(), weight, scale).to(x.dtype)
    return y if out is None else out.copy_(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dia-1.6b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quality-steps", type=int, default=200)
    args = ap.parse_args()
    cfg = DiaConfig.preset(args.model).with_layers(args.layers, args.layers)
    fp32 = DiaTTS.random(cfg, seed=0)
    bf16 = DiaTTS(copy.deepcopy(fp32.model).to(torch.bfloat16), fp32.codec)
    int8_fp32 = DiaTTS(copy.deepcopy(fp32.model), fp32.codec)
    quantize_decoder(int8_fp32.model, "int8")
    int8_bf16 = DiaTTS(copy.deepcopy(int8_fp32.model).to(torch.bfloat16), fp32.codec)  # the same int8 weights
    models = {"fp32": fp32, "bf16": bf16, "int8-fp32": int8_fp32, "int8-bf16": int8_bf16}
    ops.register("int8_linear", "cpp", _int8_linear_any_dtype)
    try:
        text = ["[S1] Dia is an open weights text to dialogue model."]
        greedy = SamplingConfig(do_sample=False)
        cases = []
        for name, tts in models.items():
            for graphs in (None, False):
                label = f"{name}{'' if graphs is None else '-eager'}"
                cases.append(DiaFastCase(tts, text, args.steps, greedy, graphs=graphs, engine=label))
        for case in cases:
            case.warm_up()
        for _ in range(args.repeat):
            for case in cases:
                case.run()
        load = os.getloadavg()[0]
        for case in cases:
            r = case.result()
            runs = [round(x, 1) for x in r.decode_steps_per_s_runs]
            print(json.dumps({"engine": r.engine, "steps_per_s": round(r.decode_steps_per_s, 1), "runs": runs,
                              "notes": r.notes}), flush=True)  # fmt: skip
        for name in ("int8-fp32", "int8-bf16"):
            t0 = time.perf_counter()
            q = quantization_quality(fp32, models[name], steps=args.quality_steps)
            keep = ("rel_logit_error", "top1_agreement_mean", "greedy_code_agreement", "audio_snr_db")
            print(json.dumps({"quality": name, **{k: q[k] for k in keep}, "s": round(time.perf_counter() - t0, 1)}))
        print(json.dumps({"threads": torch.get_num_threads(), "load_1min": round(load, 2), "cpus": os.cpu_count()}))
    finally:
        ops.register("int8_linear", "cpp", "dia_fast.ops.cpp:int8_linear")


if __name__ == "__main__":
    main()

"""Weight quantization of the decoder: ``quantize="int8" | "fp8" | "int4"``.

A decode step reads every decoder weight once, so at small batch the bytes of those weights set the speed.
What is quantized: the decoder layers' GEMMs (self-attention QKV and output, cross-attention query and output,
the MLP's gate/up and down), 98% of the decoder's weights at Dia-1.6B's widths. What is not: the embeddings
(a gather, not a GEMM), the logits head (small, and its errors go straight into the sampled codes), the
cross-attention keys and values (computed once per request from the encoder) and the encoder (once per request).

* CPU ``int8``: PyTorch's dynamic int8 linear (fbgemm/oneDNN): int8 weights with a scale per output channel;
  each GEMM quantizes its activations on the fly (per tensor) and accumulates in int32, so this is W8A8 dynamic,
  not weight-only. The model must be float32 on the CPU (that is what the kernel takes).
* CUDA ``int8`` / ``fp8`` / ``int4``: torchao's weight-only configs (``Int8WeightOnlyConfig``,
  ``Float8WeightOnlyConfig``, ``Int4WeightOnlyConfig(group_size=128)``); activations stay in the model's dtype.
  fp8 needs compute capability 8.9 or newer. **Not yet run on a GPU.**
* Apple GPUs: not supported.

Quality and speed are measured by ``python -m dia_fast.bench --quantize`` (docs/quantization.md).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import DiaModel

__all__ = ["QUANT_MODES", "check_quantize", "quantize_decoder", "quantized_mode"]

QUANT_MODES = ("int8", "fp8", "int4")
_GEMMS = ("qkv_proj", "o_proj", "q_proj", "gate_up_proj", "down_proj")  # per decoder layer (o_proj: both)


def check_quantize(mode: str | None, device: torch.device | str, dtype: torch.dtype | None = None) -> str | None:
    """``mode`` if this device (and dtype) can run it, else a one-line ``ValueError`` naming the mode, the device
    and what works there."""
    if mode is None or mode == "none":
        return None
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_MODES)} (or none), got {mode!r}")
    dev = torch.device(device)
    if dev.type == "cpu":
        if mode != "int8":
            raise ValueError(
                f"quantize={mode} has no CPU kernel in dia_fast: on the CPU use int8 (fp8 and int4 run on CUDA)"
            )
        if "fbgemm" not in torch.backends.quantized.supported_engines and (
            "x86" not in torch.backends.quantized.supported_engines
            and "qnnpack" not in torch.backends.quantized.supported_engines
        ):
            raise ValueError("quantize=int8 on the CPU needs PyTorch's quantized engines, which this build lacks")
        if dtype is not None and dtype != torch.float32:
            raise ValueError(
                f"quantize=int8 on the CPU runs with float32 activations; got dtype {dtype} "
                "(leave --dtype out or pass float32)"
            )
        return mode
    if dev.type == "cuda":
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise ValueError(f"quantize={mode} on CUDA needs torchao: pip install torchao") from None
        if mode == "fp8" and torch.cuda.get_device_capability(dev) < (8, 9):
            major, minor = torch.cuda.get_device_capability(dev)
            raise ValueError(
                f"quantize=fp8 needs compute capability 8.9+ (Ada, Hopper); {dev} is {major}.{minor}: use int8 or int4"
            )
        return mode
    raise ValueError(
        f"quantize={mode} is not supported on {dev.type}; it runs on cpu (int8) and cuda (int8, fp8, int4)"
    )


def _targets(model: DiaModel) -> list[tuple[nn.Module, str]]:
    out = []
    for layer in model.decoder.layers:
        for parent in (layer.self_attention, layer.cross_attention, layer.mlp):
            for name in _GEMMS:
                if isinstance(getattr(parent, name, None), nn.Linear):
                    out.append((parent, name))
    return out


def quantize_decoder(model: DiaModel, mode: str) -> dict[str, Any]:
    """Quantize the decoder layers' GEMMs of ``model`` in place (see the module doc); returns what was done:
    ``mode``, ``layers`` (GEMMs quantized), ``bytes_before`` and ``bytes_after`` (of those weights)."""
    mode = check_quantize(mode, model.device, model.dtype)
    if mode is None:
        return {"mode": None}
    if quantized_mode(model) is not None:
        raise ValueError(f"the model is already quantized ({quantized_mode(model)})")
    targets = _targets(model)
    before = sum(getattr(p, n).weight.numel() * getattr(p, n).weight.element_size() for p, n in targets)
    if model.device.type == "cpu":
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        with warnings.catch_warnings():
            # torch 2.13 marks its quantized-tensor constructors deprecated (docs/quantization.md); the kernels run
            warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
            for parent, name in targets:
                lin = getattr(parent, name)
                lin.qconfig = per_channel_dynamic_qconfig
                setattr(parent, name, DynamicLinear.from_float(lin))
        after = sum(_packed_bytes(getattr(p, n)) for p, n in targets)
    else:  # CUDA: torchao weight-only
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )

        config = {
            "int8": Int8WeightOnlyConfig(),
            "fp8": Float8WeightOnlyConfig(),
            "int4": Int4WeightOnlyConfig(group_size=128),
        }[mode]
        wanted = {id(getattr(p, n)) for p, n in targets}
        quantize_(model.decoder, config, filter_fn=lambda m, _fqn: id(m) in wanted)
        after = None  # torchao's tensor subclasses: measured by the bench as device memory
    model._dia_fast_quantized = mode  # noqa: SLF001 - read by quantized_mode()
    return {"mode": mode, "layers": len(targets), "bytes_before": before, "bytes_after": after}


def _packed_bytes(module: nn.Module) -> int:
    w = module.weight()  # the int8 weight of a dynamic quantized Linear, a scale and zero point per output channel
    return w.numel() * w.element_size() + w.shape[0] * (4 + 8)


def quantized_mode(model: nn.Module) -> str | None:
    """The quantization applied to ``model`` (None: full precision)."""
    return getattr(model, "_dia_fast_quantized", None)

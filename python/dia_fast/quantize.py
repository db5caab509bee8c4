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

An int8 model saves (``DiaTTS.save_pretrained``: int8 weights with a scale per row, ``quantization.json``) and
loads back as it is. Quality and speed are measured by ``python -m dia_fast.bench --quantize``
(docs/quantization.md).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import DiaModel

__all__ = [
    "QUANT_MODES",
    "check_quantize",
    "load_int8",
    "quantize_decoder",
    "quantized_mode",
    "quantized_state",
    "read_quantization",
]

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
    """(parent module, attribute) of each GEMM of :func:`target_names` that is still a full-precision Linear."""
    out = []
    for name in target_names(model):
        parent, _, attr = name.rpartition(".")
        if isinstance(model.get_submodule(name), nn.Linear):
            out.append((model.get_submodule(parent), attr))
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


# ---------------------------------------------------------------------------------------------- saved int8 models
QUANT_FILE = "quantization.json"
_INT8_FORMAT = "dia_fast.dynamic-int8/1"


def target_names(model: DiaModel) -> list[str]:
    """Module names of the GEMMs :func:`quantize_decoder` quantizes (``decoder.layers.0.mlp.down_proj``, ...)."""
    out = []
    for layer_name, layer in model.decoder.layers.named_children():
        for part in ("self_attention", "cross_attention", "mlp"):
            for gemm in _GEMMS:
                if getattr(getattr(layer, part), gemm, None) is not None:
                    out.append(f"decoder.layers.{layer_name}.{part}.{gemm}")
    return out


def quantized_state(model: DiaModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of an int8-quantized (CPU) model for a safetensors file: full-precision tensors under their
    names, each quantized GEMM as ``<name>.weight_int8`` (int8 [out, in]), ``.weight_scale`` (fp32 [out]) and
    ``.weight_zero_point`` (int64 [out]); and the ``quantization.json`` document."""
    mode = quantized_mode(model)
    if mode != "int8" or model.device.type != "cpu":
        raise ValueError(
            f"saving a quantized model is supported for int8 on the CPU; this one is {mode} on {model.device.type}"
        )
    names = target_names(model)
    skip = tuple(f"{n}." for n in names)
    # the parameters under dia_fast's own names (state_dict() would split the self-attention QKV GEMMs)
    state = {k: v.detach().contiguous() for k, v in model.named_parameters() if not k.startswith(skip)}
    for name in names:
        w = model.get_submodule(name).weight()
        state[f"{name}.weight_int8"] = w.int_repr().contiguous()
        state[f"{name}.weight_scale"] = w.q_per_channel_scales().float().contiguous()
        state[f"{name}.weight_zero_point"] = w.q_per_channel_zero_points().long().contiguous()
    return state, {"mode": "int8", "format": _INT8_FORMAT, "quantized": names}


def read_quantization(directory: Path) -> dict[str, Any] | None:
    """The ``quantization.json`` of a saved quantized model directory (None: a full-precision checkpoint)."""
    path = Path(directory) / QUANT_FILE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("format") != _INT8_FORMAT:
        raise ValueError(f"{path}: unknown quantized format {doc.get('format')!r} (this dia_fast reads {_INT8_FORMAT})")
    return doc


def load_int8(model: DiaModel, state: dict[str, torch.Tensor], names: list[str], source: str) -> None:
    """Fill ``model`` (built on the meta device) from :func:`quantized_state`'s tensors: the full-precision ones are
    loaded strictly, then the quantized GEMMs become dynamic int8 linears holding the saved int8 weights and scales."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    saved = {}
    for name in names:
        try:
            saved[name] = tuple(state.pop(f"{name}.weight_{k}") for k in ("int8", "scale", "zero_point"))
        except KeyError as exc:
            raise ValueError(f"{source}: the quantized weights of {name} are missing ({exc})") from None
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = sorted(set(missing) - {f"{n}.weight" for n in names})
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated", category=UserWarning)
        for name, (q, scale, zero) in saved.items():
            lin = model.get_submodule(name)
            shape = (lin.out_features, lin.in_features)
            if q.dtype != torch.int8 or tuple(q.shape) != shape or scale.shape != (shape[0],):
                raise ValueError(
                    f"{source}: {name} must be int8 {shape} with {shape[0]} scales, got {q.dtype} "
                    f"{tuple(q.shape)} and {tuple(scale.shape)}"
                )
            weight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero.long(), 0)
            dyn = DynamicLinear(lin.in_features, lin.out_features, bias_=False, dtype=torch.qint8)
            dyn.set_weight_bias(weight, None)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, dyn)
    model._dia_fast_quantized = "int8"  # noqa: SLF001 - read by quantized_mode()

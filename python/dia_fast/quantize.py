"""Weight quantization of the decoder: ``quantize="int8" | "fp8" | "int4"``.

A decode step reads every decoder weight once, so at small batch the bytes of those weights set the speed.
What is quantized (:data:`DEFAULT_PARTS`, chosen by measurement in docs/quantization.md): every GEMM of the
decoder that runs per step: the layers' self-attention QKV and output, cross-attention query and output, the
MLP's gate/up and down, and the logits head. What is not: the embeddings (a gather of 9 rows per step, not a
GEMM), the cross-attention keys and values (computed once per request from the encoder) and the encoder (once
per request).

* CPU ``int8``: weight-only: int8 weights with one fp32 scale per output row (:class:`~dia_fast.model.int8.
  Int8Linear`), run by the C++ kernel ``ops.int8_linear`` (csrc/linear.cpp); activations stay float32. The model
  must be float32 on the CPU.
* CUDA ``int8`` / ``fp8`` / ``int4``: torchao's weight-only configs (``Int8WeightOnlyConfig``,
  ``Float8WeightOnlyConfig``, ``Int4WeightOnlyConfig(group_size=128)``); activations stay in the model's dtype.
  fp8 needs compute capability 8.9 or newer. **Not yet run on a GPU.**
* Apple GPUs: not supported.

A CPU int8 model loads from a full-precision checkpoint one tensor at a time (:func:`load_quantized`: the
full-precision GEMM weights are never all in memory), saves (``DiaTTS.save_pretrained``: int8 weights with their
scales, ``quantization.json``) and loads back as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .model.int8 import Int8Linear, quantize_rows

if TYPE_CHECKING:
    from .model import DiaModel

__all__ = [
    "DEFAULT_PARTS",
    "PARTS",
    "QUANT_MODES",
    "check_quantize",
    "load_int8",
    "load_quantized",
    "quantize_decoder",
    "quantized_mode",
    "quantized_state",
    "read_quantization",
]

QUANT_MODES = ("int8", "fp8", "int4")
_GEMMS = ("qkv_proj", "o_proj", "q_proj", "gate_up_proj", "down_proj")  # per decoder layer (o_proj: both)
#: the kinds of decoder GEMM that can be quantized; ``logits``: the output head
PARTS = ("self_attention", "cross_attention", "mlp", "logits")
DEFAULT_PARTS = PARTS


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


def _targets(model: DiaModel, parts: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of each GEMM of :func:`target_names` that is still a full-precision Linear."""
    out = []
    for name in target_names(model, parts):
        parent, _, attr = name.rpartition(".")
        if isinstance(model.get_submodule(name), nn.Linear):
            out.append((model.get_submodule(parent), attr))
    return out


def quantize_decoder(model: DiaModel, mode: str, parts: tuple[str, ...] = DEFAULT_PARTS) -> dict[str, Any]:
    """Quantize the decoder's GEMMs of ``model`` in place (see the module doc); returns what was done:
    ``mode``, ``layers`` (GEMMs quantized), ``bytes_before`` and ``bytes_after`` (of those weights).
    ``parts``: which kinds of GEMM (:data:`PARTS`; the default is what docs/quantization.md measured)."""
    mode = check_quantize(mode, model.device, model.dtype)
    if mode is None:
        return {"mode": None}
    if quantized_mode(model) is not None:
        raise ValueError(f"the model is already quantized ({quantized_mode(model)})")
    bad = sorted(set(parts) - set(PARTS))
    if bad or not parts:
        raise ValueError(f"parts must be a non-empty subset of {', '.join(PARTS)}, got {', '.join(bad) or 'none'}")
    targets = _targets(model, tuple(parts))
    before = sum(getattr(p, n).weight.numel() * getattr(p, n).weight.element_size() for p, n in targets)
    if model.device.type == "cpu":
        for parent, name in targets:
            setattr(parent, name, Int8Linear.from_weight(getattr(parent, name).weight))
        after = sum(_int8_bytes(getattr(p, n)) for p, n in targets)
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


def _int8_bytes(module: Int8Linear) -> int:
    return module.weight_int8.numel() + module.weight_scale.numel() * 4


def quantized_mode(model: nn.Module) -> str | None:
    """The quantization applied to ``model`` (None: full precision)."""
    return getattr(model, "_dia_fast_quantized", None)


# ---------------------------------------------------------------------------------------------- saved int8 models
QUANT_FILE = "quantization.json"
_INT8_FORMAT = "dia_fast.int8-weight-only/2"


def target_names(model: DiaModel, parts: tuple[str, ...] = DEFAULT_PARTS) -> list[str]:
    """Module names of the GEMMs :func:`quantize_decoder` quantizes for ``parts`` (``decoder.layers.0.mlp.down_proj``,
    ..., ``decoder.logits_dense``)."""
    out = []
    for layer_name, layer in model.decoder.layers.named_children():
        for part in ("self_attention", "cross_attention", "mlp"):
            if part not in parts:
                continue
            for gemm in _GEMMS:
                if getattr(getattr(layer, part), gemm, None) is not None:
                    out.append(f"decoder.layers.{layer_name}.{part}.{gemm}")
    if "logits" in parts:
        out.append("decoder.logits_dense")
    return out


def quantized_state(model: DiaModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of an int8-quantized (CPU) model for a safetensors file: full-precision tensors under their
    names, each quantized GEMM as ``<name>.weight_int8`` (int8 [out, in]) and ``<name>.weight_scale`` (fp32
    [out]); and the ``quantization.json`` document."""
    mode = quantized_mode(model)
    if mode != "int8" or model.device.type != "cpu":
        raise ValueError(
            f"saving a quantized model is supported for int8 on the CPU; this one is {mode} on {model.device.type}"
        )
    names = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    # the parameters under dia_fast's own names (state_dict() would split the self-attention QKV GEMMs)
    state = {k: v.detach().contiguous() for k, v in model.named_parameters()}
    for name in names:
        lin = model.get_submodule(name)
        state[f"{name}.weight_int8"] = lin.weight_int8.contiguous()
        state[f"{name}.weight_scale"] = lin.weight_scale.contiguous()
    return state, {"mode": "int8", "format": _INT8_FORMAT, "quantized": names}


def read_quantization(directory: Path) -> dict[str, Any] | None:
    """The ``quantization.json`` of a saved quantized model directory (None: a full-precision checkpoint)."""
    path = Path(directory) / QUANT_FILE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("format") != _INT8_FORMAT:
        raise ValueError(
            f"{path}: unknown quantized format {doc.get('format')!r} (this dia_fast reads {_INT8_FORMAT}; "
            "quantize the full-precision checkpoint again)"
        )
    return doc


def _install_int8(model: DiaModel, names: list[str]) -> dict[str, Int8Linear]:
    """Replace the GEMMs ``names`` of a meta-device ``model`` with empty CPU :class:`Int8Linear` layers."""
    layers = {}
    for name in names:
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear) or lin.bias is not None:
            raise ValueError(f"{name} is not a bias-free linear layer of this model")
        layer = Int8Linear(lin.in_features, lin.out_features, device="cpu")
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, layer)
        layers[name] = layer
    return layers


def load_int8(model: DiaModel, state: dict[str, torch.Tensor], names: list[str], source: str) -> None:
    """Fill ``model`` (built on the meta device) from :func:`quantized_state`'s tensors: the full-precision ones are
    loaded strictly, the quantized GEMMs become :class:`Int8Linear` layers holding the saved int8 weights and
    scales."""
    layers = _install_int8(model, names)
    for name, layer in layers.items():
        try:
            q, scale = state.pop(f"{name}.weight_int8"), state.pop(f"{name}.weight_scale")
        except KeyError as exc:
            raise ValueError(f"{source}: the quantized weights of {name} are missing ({exc})") from None
        shape = tuple(layer.weight_int8.shape)
        if q.dtype != torch.int8 or tuple(q.shape) != shape or tuple(scale.shape) != shape[:1]:
            raise ValueError(
                f"{source}: {name} must be int8 {shape} with {shape[0]} scales, got {q.dtype} "
                f"{tuple(q.shape)} and {tuple(scale.shape)}"
            )
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(f"{source}: the scales of {name} must be positive and finite")
        layer.weight_int8, layer.weight_scale = q.contiguous(), scale.float().contiguous()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    quantized_keys = {f"{n}.{k}" for n in names for k in ("weight_int8", "weight_scale")}
    missing = sorted(set(missing) - quantized_keys)
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    model._dia_fast_quantized = "int8"  # noqa: SLF001 - read by quantized_mode()


def load_quantized(
    model: DiaModel,
    tensors: Iterable[tuple[str, torch.Tensor]],
    mode: str,
    dtype: torch.dtype,
    source: str,
    parts: tuple[str, ...] = DEFAULT_PARTS,
) -> None:
    """Fill ``model`` (built on the meta device) from a full-precision checkpoint's ``(name, tensor)`` pairs in
    dia_fast's layout, quantizing each GEMM weight as it arrives (CPU int8): the full-precision GEMM weights are
    never all in memory, only the one being quantized. The self-attention's q, k and v parts are quantized into
    their rows of the fused QKV GEMM (per-row scales make that exact). Strict: missing, unexpected and mis-shaped
    tensors raise :class:`~dia_fast.checkpoint.CheckpointError`."""
    from .checkpoint import fill_model

    if mode != "int8":
        raise ValueError(f"quantizing while loading is implemented for int8 on the CPU, not {mode}")
    names = target_names(model, parts)
    layers = _install_int8(model, names)

    def into_rows(layer: Int8Linear, row: int) -> Callable[[torch.Tensor], None]:
        def write(weight: torch.Tensor) -> None:
            q, scale = quantize_rows(weight)
            layer.weight_int8[row : row + q.shape[0]] = q
            layer.weight_scale[row : row + q.shape[0]] = scale

        return write

    # checkpoint name -> (its shape, what quantizes it into its rows of an int8 layer)
    sinks: dict[str, tuple[torch.Size, Callable[[torch.Tensor], None]]] = {}
    for name, layer in layers.items():
        base, _, gemm = name.rpartition(".")
        parts_rows = (
            zip(("q_proj", "k_proj", "v_proj"), model.get_submodule(base).split_sizes, strict=True)
            if gemm == "qkv_proj"
            else [(gemm, layer.out_features)]
        )
        row = 0
        for proj, rows in parts_rows:
            sinks[f"{base}.{proj}.weight"] = (torch.Size([rows, layer.in_features]), into_rows(layer, row))
            row += rows
    fill_model(model, tensors, dtype, source, sinks)
    model._dia_fast_quantized = mode  # noqa: SLF001 - read by quantized_mode()

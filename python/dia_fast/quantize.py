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
* CPU ``int4``: the MLP's GEMMs (:data:`INT4_PARTS`, 73% of a layer's weights) get int4 weights (two per
  byte) with one fp32 scale per 128 input columns (64 where 128 does not divide a row;
  :class:`~dia_fast.model.int4.Int4Linear`, run by ``ops.int4_linear``, csrc/linear_int4.cpp); the other GEMMs
  get int8 as above. Measured: int4 costs the least accuracy there per byte saved (docs/quantization.md).
  Activations stay float32.
* CUDA ``int8``: the CPU's int8 layer, run by dia_fast's Triton kernel (:data:`CUDA_INT8_KERNEL`), or torchao's
  ``Int8WeightOnlyConfig`` with ``int8_kernel="torchao"``. ``fp8``: torchao's ``Float8WeightOnlyConfig`` (compute
  capability 8.9+; slow: it warns). ``int4``: ``Int4WeightOnlyConfig`` in the ``tile_packed_to_4d`` packing
  (PyTorch's own tinygemm kernel, one bf16 scale and zero per 128 input columns) on the same :data:`INT4_PARTS` as
  the CPU, int8 on the rest (compute capability 8.0+, bfloat16). Activations stay in the model's dtype. Run on an
  H200 (docs/quantization.md has the numbers); in CI the torchao path runs on the CPU, with the CPU's int4 kernel
  standing in for tinygemm (tests/torchao_cpu.py).
* Apple GPUs: not supported.

A quantized model loads from a full-precision checkpoint one tensor at a time, each GEMM quantized as its weight
arrives, so the full-precision GEMM weights are never all in memory (CPU: :func:`load_quantized`; CUDA:
:func:`load_cuda_quantized`). Every mode saves (``DiaTTS.save_pretrained``) a directory that loads back as it is
(:mod:`dia_fast.quantized_dir`): int8 and CPU int4 directories on either device, CUDA int4 and fp8 ones on CUDA.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .model.int4 import Int4Linear, quantize_groups
from .model.int8 import Int8Linear, quantize_rows

if TYPE_CHECKING:
    from .model import DiaModel

__all__ = [
    "CPU_MODES",
    "CUDA_INT8_KERNEL",
    "CUDA_INT8_KERNELS",
    "DEFAULT_PARTS",
    "INT4_PARTS",
    "PARTS",
    "QUANT_MODES",
    "check_quantize",
    "cuda_layer",
    "gemm_kinds",
    "load_cuda_quantized",
    "load_quantized",
    "quantize_cuda",
    "quantize_decoder",
    "quantized_mode",
    "stored_bytes",
    "target_names",
    "torchao_config",
    "torchao_quantized",
]

QUANT_MODES = ("int8", "fp8", "int4")
CPU_MODES = ("int8", "int4")  # the modes with a C++ kernel (the model stays float32)
#: the kinds of GEMM that ``int4`` quantizes to int4 on every device (the others of ``parts`` get int8), chosen by
#: measured quality (docs/quantization.md)
INT4_PARTS = ("mlp",)
#: torchao's int4 group sizes (tinygemm's), largest first: a GEMM gets the largest that divides its row
_TORCHAO_INT4_GROUPS = (128, 64, 32)
#: what runs CUDA's int8 GEMMs: ``"torchao"`` (its int8 weight-only tensors; eagerly they write a bf16 copy of the
#: weight and multiply that) or ``"dia_fast"`` (:class:`~dia_fast.model.int8.Int8Linear`, the CPU's layer, whose
#: ``ops.int8_linear`` runs the Triton kernel of :mod:`dia_fast.ops.triton_linear` on CUDA, reading each weight
#: once as one byte). The default is dia_fast's: on an H200 (Dia-1.6B, bf16, CUDA graphs, 2026-11-30) it ran
#: 782 / 720 decode steps/s at batch 1 / 8 against torchao's 191 / 187 and bf16's 724 / 635 (docs/quantization.md).
CUDA_INT8_KERNELS = ("torchao", "dia_fast")
CUDA_INT8_KERNEL = "dia_fast"
_GEMMS = ("qkv_proj", "o_proj", "q_proj", "gate_up_proj", "down_proj")  # per decoder layer (o_proj: both)
#: the kinds of decoder GEMM that can be quantized; ``logits``: the output head
PARTS = ("self_attention", "cross_attention", "mlp", "logits")
DEFAULT_PARTS = PARTS


def check_quantize(
    mode: str | None, device: torch.device | str, dtype: torch.dtype | None = None, int8_kernel: str | None = None
) -> str | None:
    """``mode`` if this device (and dtype) can run it, else a one-line ``ValueError`` naming the mode, the device
    and what works there. ``int8_kernel``: CUDA's int8 kernel to run (default :data:`CUDA_INT8_KERNEL`)."""
    if mode is None or mode == "none":
        return None
    if mode not in QUANT_MODES:
        raise ValueError(f"quantize must be one of {', '.join(QUANT_MODES)} (or none), got {mode!r}")
    dev = torch.device(device)
    if dev.type == "cpu":
        if mode not in CPU_MODES:
            raise ValueError(
                f"quantize={mode} has no CPU kernel in dia_fast: on the CPU use int8 or int4 (fp8 runs on CUDA)"
            )
        if dtype is not None and dtype != torch.float32:
            raise ValueError(
                f"quantize={mode} on the CPU runs with float32 activations; got dtype {dtype} "
                "(leave --dtype out or pass float32)"
            )
        return mode
    if dev.type == "cuda":
        if mode != "int8" or _int8_kernel(int8_kernel) == "torchao":  # dia_fast's int8 layer needs only Triton
            try:
                import torchao  # noqa: F401
            except ImportError:
                also = "" if mode != "int8" else " on torchao's kernel"
                raise ValueError(f"quantize={mode} on CUDA{also} needs torchao: pip install torchao") from None
        major, minor = torch.cuda.get_device_capability(dev)
        if mode == "fp8" and (major, minor) < (8, 9):
            raise ValueError(
                f"quantize=fp8 needs compute capability 8.9+ (Ada, Hopper); {dev} is {major}.{minor}: use int8 or int4"
            )
        if mode == "fp8":  # it works, but a user choosing it for speed should know
            warnings.warn(
                "quantize=fp8 on CUDA runs through torchao's fp8 weight-only layer, which dequantizes each weight on "
                "every call: measured 0.13-0.16x bfloat16's decode speed on an H200; int8 holds the same bytes and "
                "ran 1.08-1.17x bfloat16 (docs/quantization.md)",
                stacklevel=2,
            )
        if mode == "int4" and major < 8:
            raise ValueError(
                f"quantize=int4 on CUDA needs compute capability 8.0+ (torchao's tinygemm kernel); {dev} is "
                f"{major}.{minor}: use int8"
            )
        if mode == "int4" and dtype is not None and dtype != torch.bfloat16:
            raise ValueError(
                f"quantize=int4 on CUDA runs with bfloat16 weights and activations (torchao's tinygemm kernel); got "
                f"dtype {dtype} (leave --dtype out or pass bfloat16)"
            )
        return mode
    raise ValueError(
        f"quantize={mode} is not supported on {dev.type}; it runs on cpu (int8, int4) and cuda (int8, fp8, int4)"
    )


def _targets(model: DiaModel, parts: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute) of each GEMM of :func:`target_names` that is still a full-precision Linear."""
    out = []
    for name in target_names(model, parts):
        parent, _, attr = name.rpartition(".")
        if isinstance(model.get_submodule(name), nn.Linear):
            out.append((model.get_submodule(parent), attr))
    return out


def gemm_kinds(model: DiaModel, mode: str, parts: tuple[str, ...], int4_parts: tuple[str, ...]) -> dict[str, str]:
    """GEMM name -> ``"int8"``, ``"fp8"`` or ``"int4"``: what ``mode`` makes of each GEMM of ``parts`` (``int4``:
    int4 on those of ``int4_parts``, int8 on the others; the other modes: ``mode`` on all)."""
    kinds = dict.fromkeys(target_names(model, parts), "int8" if mode == "int4" else mode)
    if mode == "int4":
        kinds.update(dict.fromkeys(target_names(model, tuple(p for p in parts if p in int4_parts)), "int4"))
    return kinds


def quantize_decoder(
    model: DiaModel,
    mode: str,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    int4_parts: tuple[str, ...] = INT4_PARTS,
    int8_kernel: str | None = None,
) -> dict[str, Any]:
    """Quantize the decoder's GEMMs of ``model`` in place (see the module doc); returns what was done:
    ``mode``, ``layers`` (GEMMs quantized), ``bytes_before`` and ``bytes_after`` (of those weights).
    ``parts``: which kinds of GEMM (:data:`PARTS`; the default is what docs/quantization.md measured).
    ``int4_parts``: int4 only, which of ``parts`` get int4 (the others get int8).
    ``int8_kernel``: CUDA only, what runs the int8 GEMMs (:data:`CUDA_INT8_KERNELS`; default
    :data:`CUDA_INT8_KERNEL`)."""
    mode = check_quantize(mode, model.device, model.dtype, int8_kernel)
    if mode is None:
        return {"mode": None}
    if quantized_mode(model) is not None:
        raise ValueError(f"the model is already quantized ({quantized_mode(model)})")
    bad = sorted(set(parts) - set(PARTS))
    if bad or not parts:
        raise ValueError(f"parts must be a non-empty subset of {', '.join(PARTS)}, got {', '.join(bad) or 'none'}")
    bad = sorted(set(int4_parts) - set(PARTS))
    if bad:
        raise ValueError(f"int4_parts must be a subset of {', '.join(PARTS)}, got {', '.join(bad)}")
    targets = _targets(model, tuple(parts))
    before = sum(getattr(p, n).weight.numel() * getattr(p, n).weight.element_size() for p, n in targets)
    kinds = gemm_kinds(model, mode, tuple(parts), tuple(int4_parts))
    for name in kinds:  # before any layer is replaced: a failure leaves the model as it was
        if not bool(torch.isfinite(model.get_submodule(name).weight).all()):
            raise ValueError(f"{name}: the weight holds NaN or infinite values: it cannot be quantized")
    if model.device.type == "cpu":
        for name, kind in kinds.items():  # shapes first: one that int4 cannot take leaves the model as it was
            if kind == "int4":
                lin = model.get_submodule(name)
                try:
                    Int4Linear(lin.in_features, lin.out_features, device="meta")
                except ValueError as exc:
                    raise ValueError(f"{name}: {exc}") from None
        for name, kind in kinds.items():  # then one at a time (each full-precision weight freed as it goes)
            layer_class = Int8Linear if kind == "int8" else Int4Linear
            _set_module(model, name, layer_class.from_weight(model.get_submodule(name).weight))
        after = sum(_buffer_bytes(getattr(p, n)) for p, n in targets)
    else:  # CUDA: torchao weight-only (int8: or dia_fast's Int8Linear)
        quantize_cuda(model, kinds, int8_kernel)
        after = sum(_layer_bytes(getattr(p, n)) for p, n in targets)
    model._dia_fast_quantized = mode  # noqa: SLF001 - read by quantized_mode()
    return {"mode": mode, "layers": len(targets), "bytes_before": before, "bytes_after": after}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` under the dotted ``name`` (in place of what is there)."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def _row_sinks(
    model: DiaModel, shapes: dict[str, tuple[int, int]], writer: Callable[[str, int], Callable[[torch.Tensor], None]]
) -> dict[str, tuple[torch.Size, Callable[[torch.Tensor], None]]]:
    """The ``sinks`` of :func:`~dia_fast.checkpoint.fill_model` for the GEMMs ``shapes`` (name -> (in, out)): each
    checkpoint weight that makes rows of one (a self-attention's q, k and v make the fused QKV; any other GEMM is
    one weight), with its shape and ``writer(gemm name, first row)``."""
    sinks: dict[str, tuple[torch.Size, Callable[[torch.Tensor], None]]] = {}
    for name, (in_features, out_features) in shapes.items():
        base, _, gemm = name.rpartition(".")
        parts_rows = (
            zip(("q_proj", "k_proj", "v_proj"), model.get_submodule(base).split_sizes, strict=True)
            if gemm == "qkv_proj"
            else [(gemm, out_features)]
        )
        row = 0
        for proj, rows in parts_rows:
            sinks[f"{base}.{proj}.weight"] = (torch.Size([rows, in_features]), writer(name, row))
            row += rows
    return sinks


def torchao_config(kind: str, in_features: int) -> Any:
    """torchao's weight-only config for one GEMM of ``in_features`` columns quantized to ``kind`` (int8, fp8, int4).
    int4 uses the ``tile_packed_to_4d`` packing: its kernel (tinygemm, ``aten._weight_int4pack_mm``) is part of
    PyTorch; torchao's default int4 packing needs the separate ``mslk`` kernels."""
    from torchao.quantization import Float8WeightOnlyConfig, Int4WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: torchao would otherwise change torch.compile's global settings for the process
    if kind == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    if kind == "fp8":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    group = next((g for g in _TORCHAO_INT4_GROUPS if in_features % g == 0), None)
    if group is None:
        raise ValueError(f"int4 needs in_features divisible by {_TORCHAO_INT4_GROUPS[-1]}, got {in_features}")
    return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)


def torchao_quantized(linear: nn.Linear, kind: str, name: str = "linear") -> nn.Linear:
    """``linear`` with its weight quantized by torchao to ``kind`` (see :func:`torchao_config`); torchao leaving it
    in full precision (it skips shapes it cannot take, with only a log line) is an error naming ``name``."""
    from torchao.quantization import quantize_

    holder = nn.Sequential(linear)
    quantize_(holder, torchao_config(kind, linear.in_features))
    if type(holder[0].weight) in (nn.Parameter, torch.Tensor):
        shape = f"{linear.out_features} x {linear.in_features}"
        raise ValueError(f"torchao left {name} ({shape}) in full precision instead of {kind}")
    return holder[0]


def quantize_cuda(model: DiaModel, kinds: dict[str, str], int8_kernel: str | None = None) -> None:
    """Quantize the GEMMs of ``model`` named in ``kinds`` (name -> kind, :func:`gemm_kinds`) in place as the CUDA
    modes do (:func:`cuda_layer`; torchao's CPU tensors run the same code on the CPU)."""
    for name, kind in kinds.items():  # shapes a mode cannot take, before torchao changes any layer in place
        if not (kind == "int8" and _int8_kernel(int8_kernel) == "dia_fast"):
            try:
                torchao_config(kind, model.get_submodule(name).in_features)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
    for name, kind in kinds.items():
        _set_module(model, name, cuda_layer(model.get_submodule(name), kind, name, int8_kernel))


def cuda_layer(linear: nn.Linear, kind: str, name: str = "linear", int8_kernel: str | None = None) -> nn.Module:
    """The CUDA modes' quantized layer for ``linear``: torchao's (:func:`torchao_quantized`), or for an int8 GEMM
    with ``int8_kernel="dia_fast"`` an :class:`~dia_fast.model.int8.Int8Linear` on the weight's device."""
    if _int8_kernel(int8_kernel) == "dia_fast" and kind == "int8":
        return Int8Linear.from_weight(linear.weight)
    return torchao_quantized(linear, kind, name)


def _int8_kernel(int8_kernel: str | None) -> str:
    kernel = CUDA_INT8_KERNEL if int8_kernel is None else int8_kernel
    if kernel not in CUDA_INT8_KERNELS:
        raise ValueError(f"int8_kernel must be one of {', '.join(CUDA_INT8_KERNELS)}, got {kernel!r}")
    return kernel


def _layer_bytes(layer: nn.Module) -> int:
    """Bytes of a quantized layer's weights: its buffers (dia_fast's layers) or its torchao weight."""
    return _buffer_bytes(layer) if isinstance(layer, (Int8Linear, Int4Linear)) else stored_bytes(layer.weight)


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` holds; for a tensor subclass (torchao's), those of the tensors inside it."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    return tensor.numel() * tensor.element_size()


def _buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def quantized_mode(model: nn.Module) -> str | None:
    """The quantization applied to ``model`` (None: full precision)."""
    return getattr(model, "_dia_fast_quantized", None)


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


def install_cpu_layers(
    model: DiaModel, kinds: dict[str, str], groups: dict[str, int] | None = None, device: str = "cpu"
) -> dict[str, nn.Module]:
    """Replace the GEMMs of a meta-device ``model`` named in ``kinds`` with empty CPU :class:`Int8Linear` or
    :class:`Int4Linear` layers (as ``kinds[name]`` says; int4: ``groups[name]`` columns per scale, by default
    :func:`~dia_fast.model.int4.default_group`). ``device="meta"``: placeholders whose tensors the caller assigns
    (a saved directory's), never allocated."""
    layers: dict[str, nn.Module] = {}
    for name, kind in kinds.items():
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear) or lin.bias is not None:
            raise ValueError(f"{name} is not a bias-free linear layer of this model")
        if kind == "int8":
            layer: nn.Module = Int8Linear(lin.in_features, lin.out_features, device=device)
        else:
            try:
                layer = Int4Linear(lin.in_features, lin.out_features, (groups or {}).get(name), device=device)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        _set_module(model, name, layer)
        layers[name] = layer
    return layers


def load_quantized(
    model: DiaModel,
    tensors: Iterable[tuple[str, torch.Tensor]],
    mode: str,
    dtype: torch.dtype,
    source: str,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    int4_parts: tuple[str, ...] = INT4_PARTS,
) -> None:
    """Fill ``model`` (built on the meta device) from a full-precision checkpoint's ``(name, tensor)`` pairs in
    dia_fast's layout, quantizing each GEMM weight as it arrives (CPU int8 or int4): the full-precision GEMM weights
    are never all in memory, only the one being quantized. The self-attention's q, k and v parts are quantized into
    their rows of the fused QKV GEMM (scales per row, or per group within a row, make that exact). Strict: missing,
    unexpected and mis-shaped tensors raise :class:`~dia_fast.checkpoint.CheckpointError`."""
    from .checkpoint import fill_model

    if mode not in CPU_MODES:
        raise ValueError(
            f"quantizing while loading is implemented for {' and '.join(CPU_MODES)} on the CPU, not {mode}"
        )
    layers = install_cpu_layers(model, gemm_kinds(model, mode, parts, int4_parts))

    def into_rows(name: str, row: int) -> Callable[[torch.Tensor], None]:
        layer = layers[name]

        def write(weight: torch.Tensor) -> None:
            if isinstance(layer, Int8Linear):
                q, scale = quantize_rows(weight)
                layer.weight_int8[row : row + q.shape[0]] = q
            else:
                q, scale = quantize_groups(weight, layer.group)
                layer.weight_int4[row : row + q.shape[0]] = q
            layer.weight_scale[row : row + q.shape[0]] = scale

        return write

    shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
    fill_model(model, tensors, dtype, source, _row_sinks(model, shapes, into_rows))
    model._dia_fast_quantized = mode  # noqa: SLF001 - read by quantized_mode()


class _PendingLinear(nn.Module):
    """Stands for a GEMM of a meta-device model while its full-precision weight arrives (it has no parameters, so the
    loader allocates nothing for it): the rows are gathered on the device, then quantized at once."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rows_written = 0
        self.weight: torch.Tensor | None = None


def load_cuda_quantized(
    model: DiaModel,
    tensors: Iterable[tuple[str, torch.Tensor]],
    mode: str,
    dtype: torch.dtype,
    device: torch.device,
    source: str,
    parts: tuple[str, ...] = DEFAULT_PARTS,
    int4_parts: tuple[str, ...] = INT4_PARTS,
    int8_kernel: str | None = None,
) -> None:
    """Fill ``model`` (built on the meta device) from a full-precision checkpoint's ``(name, tensor)`` pairs,
    quantizing each GEMM as soon as its weight has arrived (the CUDA modes; each GEMM as :func:`gemm_kinds` says):
    the weight is gathered on ``device`` in ``dtype`` (a self-attention's q, k and v into their rows of the fused
    QKV), quantized by :func:`cuda_layer` and its full-precision copy dropped, so at most one GEMM is ever in full
    precision. The other tensors load as :func:`~dia_fast.checkpoint.fill_model` loads
    them (then the caller moves the model to ``device``). Strict, as ``fill_model``: a GEMM left incomplete is an
    error."""
    from .checkpoint import fill_model

    kinds = gemm_kinds(model, mode, parts, int4_parts)
    _int8_kernel(int8_kernel)  # a bad name fails before anything loads
    pending: dict[str, _PendingLinear] = {}
    for name in kinds:
        lin = model.get_submodule(name)
        pending[name] = _PendingLinear(lin.in_features, lin.out_features)
        _set_module(model, name, pending[name])

    def into_rows(name: str, row: int) -> Callable[[torch.Tensor], None]:
        def write(weight: torch.Tensor) -> None:
            p = pending[name]
            if p.weight is None:
                p.weight = torch.empty(p.out_features, p.in_features, dtype=dtype, device=device)
            p.weight[row : row + weight.shape[0]] = weight.to(device=device, dtype=dtype)
            p.rows_written += weight.shape[0]
            if p.rows_written == p.out_features:  # complete: quantize it now and drop the full-precision rows
                linear = nn.Linear(p.in_features, p.out_features, bias=False, device="meta")
                linear.weight = nn.Parameter(p.weight, requires_grad=False)
                p.weight = None
                _set_module(model, name, cuda_layer(linear, kinds[name], name, int8_kernel))

        return write

    shapes = {name: (p.in_features, p.out_features) for name, p in pending.items()}
    fill_model(model, tensors, dtype, source, _row_sinks(model, shapes, into_rows))
    left = [name for name in pending if isinstance(model.get_submodule(name), _PendingLinear)]
    if left:  # fill_model reported missing tensors already; this is a guard for duplicated ones
        raise ValueError(f"{source}: the weights of {', '.join(left[:4])} were not complete")
    model._dia_fast_quantized = mode  # noqa: SLF001 - read by quantized_mode()

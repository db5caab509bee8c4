"""Saved quantized model directories: what ``DiaTTS.save_pretrained`` writes for a quantized model and
``DiaTTS.from_pretrained`` loads back as it is (never quantized again).

A directory holds ``config.json``, ``model.safetensors`` (the full-precision tensors under dia_fast's names and,
for each quantized GEMM ``<name>``, its quantized weight with its scales) and ``quantization.json`` (:data:`QUANT_FILE`:
the mode, the format, the quantized GEMMs and the int4 GEMMs' groups). The formats, by what each GEMM holds:

* ``dia_fast.int8-weight-only/2`` (CPU and CUDA int8): ``<name>.weight_int8`` int8 [out, in] and
  ``<name>.weight_scale`` fp32 [out] (``W = q * scale``). Loads on either device.
* ``dia_fast.int4-weight-only/1`` (CPU int4): the MLP's GEMMs as ``weight_int4``, symmetric int4 in the CPU
  kernel's packing (:func:`~dia_fast.ops.reference.pack_int4`, uint8 [out, in / 2]) with fp32 scales
  [out, in / group] (``W = q * scale``); the others as int8. Loads on either device (on CUDA as tinygemm's weights:
  the scales rounded to bf16).
* ``dia_fast.int4-zero-point-weight-only/1`` (CUDA int4: torchao's tinygemm groups, which have zero points): the
  MLP's GEMMs as ``weight_uint4`` (values 0-15, two per byte, the even column in the high nibble; uint8
  [out, in / 2]), ``weight_scale`` and ``weight_zero`` (fp32 [out, in / group], bf16 values:
  ``W = (q - 8) * scale + zero``); the others as int8. Loads on CUDA only: the CPU's int4 kernel has no zero points.
* ``dia_fast.fp8-weight-only/1`` (CUDA fp8): ``weight_fp8`` float8_e4m3fn [out, in] and ``weight_scale`` fp32 [out]
  (``W = q * scale``). Loads on CUDA (compute capability 8.9+) only.

Loading (:func:`load_saved`) puts the CPU layers (:class:`~dia_fast.model.int8.Int8Linear`,
:class:`~dia_fast.model.int4.Int4Linear`) in a meta-device model, or a holder for the CUDA-only formats;
:func:`cuda_from_saved` then turns them into the CUDA modes' layers holding the same values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import CheckpointError, check_weights
from .model.int4 import Int4Linear
from .model.int8 import Int8Linear
from .ops.reference import unpack_int4
from .quantize import _int8_kernel, _set_module, install_cpu_layers, quantized_mode

if TYPE_CHECKING:
    from .model import DiaModel

__all__ = [
    "CUDA_ONLY_FORMATS",
    "FORMATS",
    "QUANT_FILE",
    "check_saved_device",
    "cuda_from_saved",
    "load_saved",
    "quantized_state",
    "read_quantization",
]

QUANT_FILE = "quantization.json"
#: format -> (mode, what the GEMMs listed under ``"int4"`` in quantization.json hold, what the other GEMMs hold)
FORMATS: dict[str, tuple[str, str | None, str]] = {
    "dia_fast.int8-weight-only/2": ("int8", None, "int8"),
    "dia_fast.int4-weight-only/1": ("int4", "int4", "int8"),
    "dia_fast.int4-zero-point-weight-only/1": ("int4", "int4z", "int8"),
    "dia_fast.fp8-weight-only/1": ("fp8", None, "fp8"),
}
#: the formats that only CUDA can run
CUDA_ONLY_FORMATS = ("dia_fast.int4-zero-point-weight-only/1", "dia_fast.fp8-weight-only/1")
# per kind of saved GEMM: the weight's name suffix, dtype and shape, and the scales' shape (from in, out, group);
# int4z also has zeros of the scales' shape
_WEIGHT: dict[str, tuple[str, torch.dtype, Callable[[int, int, int], tuple[int, ...]]]] = {
    "int8": ("weight_int8", torch.int8, lambda i, o, g: (o, i)),
    "int4": ("weight_int4", torch.uint8, lambda i, o, g: (o, i // 2)),
    "int4z": ("weight_uint4", torch.uint8, lambda i, o, g: (o, i // 2)),
    "fp8": ("weight_fp8", torch.float8_e4m3fn, lambda i, o, g: (o, i)),
}
_SCALE_SHAPE: dict[str, Callable[[int, int, int], tuple[int, ...]]] = {
    "int8": lambda i, o, g: (o,),
    "int4": lambda i, o, g: (o, i // g),
    "int4z": lambda i, o, g: (o, i // g),
    "fp8": lambda i, o, g: (o,),
}
_TORCHAO_KINDS = {"Int8Tensor": "int8", "Int4TilePackedTo4dTensor": "int4z", "Float8Tensor": "fp8"}
_TINYGEMM_GROUPS = (32, 64, 128, 256)  # the groups tinygemm's kernel takes
_UNPACK_COLUMNS = 1024  # columns of a tinygemm weight read back per GEMM (bounds the temporaries)


class CudaOnlyGemm(nn.Module):
    """A saved GEMM whose quantized layer exists only on CUDA (``kind`` fp8, or int4z: int4 with zero points),
    between :func:`load_saved` and :func:`cuda_from_saved`: it holds the saved tensors (``weight``,
    ``weight_scale``, ``weight_zero``) and cannot run."""

    def __init__(self, in_features: int, out_features: int, kind: str, group: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.kind, self.group = in_features, out_features, kind, group
        self.weight: torch.Tensor | None = None
        self.weight_scale: torch.Tensor | None = None
        self.weight_zero: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"a saved {self.kind} GEMM runs on CUDA only (cuda_from_saved makes its layer)")


# ---------------------------------------------------------------------------------------------- saving
def quantized_state(model: DiaModel) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a quantized model for a safetensors file (full-precision tensors under their names, each
    quantized GEMM as its format says, see the module doc) and the ``quantization.json`` document. Every mode on
    both devices: CPU int8 / int4, and CUDA's torchao int8, int4 (tinygemm) and fp8 weights, and its
    :class:`Int8Linear` layers."""
    mode = quantized_mode(model)
    if mode is None:
        raise ValueError("the model is not quantized (save_pretrained writes it as a full-precision checkpoint)")
    gemms: dict[str, tuple[str, nn.Module]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            gemms[name] = ("int8" if isinstance(m, Int8Linear) else "int4", m)
        elif isinstance(m, nn.Linear) and _is_torchao(m.weight):
            kind = _TORCHAO_KINDS.get(type(m.weight).__name__)
            if kind is None:
                raise ValueError(f"{name}: saving torchao's {type(m.weight).__name__} weights is not supported")
            gemms[name] = (kind, m)
    int4_kinds = {kind for kind, _ in gemms.values() if kind in ("int4", "int4z")}
    if len(int4_kinds) > 1:
        raise ValueError("the model mixes the CPU's int4 layers and torchao's int4 weights; it cannot be saved")
    # an int4 model whose int4 parts were left out (int4_parts=()) has only int8 GEMMs: the CPU's int4 format
    int4_kind = next(iter(int4_kinds), "int4" if mode == "int4" else None)
    fmt = next((f for f, (f_mode, k4, _) in FORMATS.items() if f_mode == mode and k4 == int4_kind), None)
    if fmt is None:
        raise ValueError(f"no saved format holds a {mode} model with {int4_kind or 'no'} int4 GEMMs")
    # the parameters under dia_fast's own names (state_dict() would split the self-attention QKV GEMMs)
    state = {k: v.detach().contiguous() for k, v in model.named_parameters() if not _is_torchao(v)}
    groups: dict[str, int] = {}
    for name, (kind, m) in gemms.items():
        tensors, group = _gemm_tensors(kind, m, name)
        state.update({f"{name}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
        if group:
            groups[name] = group
    doc: dict[str, Any] = {"mode": mode, "format": fmt, "quantized": list(gemms)}
    if mode == "int4":  # the int4 GEMMs and their groups (the others are int8)
        doc["int4"] = groups
    return state, doc


def _gemm_tensors(kind: str, m: nn.Module, name: str) -> tuple[dict[str, torch.Tensor], int]:
    """The saved tensors of one quantized GEMM (suffix -> tensor) and its int4 group (0: none)."""
    suffix = _WEIGHT[kind][0]
    if kind in ("int8", "int4") and not _is_torchao(getattr(m, "weight", None)):  # dia_fast's own layers
        return {suffix: getattr(m, suffix), "weight_scale": m.weight_scale}, getattr(m, "group", 0)
    if kind == "int8":
        q, scale = _int8_rows(m.weight, name)
        return {suffix: q, "weight_scale": scale}, 0
    if kind == "fp8":
        q, scale = _fp8_rows(m.weight, name)
        return {suffix: q, "weight_scale": scale}, 0
    pairs, scale, zero, group = _tinygemm_groups(m.weight)
    return {suffix: pairs, "weight_scale": scale, "weight_zero": zero}, group


def _is_torchao(tensor: torch.Tensor | None) -> bool:
    return (
        tensor is not None
        and type(tensor) not in (torch.Tensor, nn.Parameter)
        and hasattr(tensor, "__tensor_flatten__")
    )


def _int8_rows(weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], fp32 [out]) of a torchao int8 weight with one scale per row and no zero point."""
    qdata, scale, zero = (getattr(weight, n, None) for n in ("qdata", "scale", "zero_point"))
    rows = qdata is not None and qdata.dtype == torch.int8 and scale is not None and scale.numel() == qdata.shape[0]
    if not rows or (zero is not None and bool(zero.any())):
        raise ValueError(f"{name}: only int8 weights with one scale per row and no zero point can be saved")
    return qdata, scale.reshape(-1).float()


def _fp8_rows(weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [out, in], fp32 [out]) of a torchao fp8 weight with one scale per row."""
    qdata, scale = weight.qdata, weight.scale
    rows = qdata.dtype == torch.float8_e4m3fn and list(weight.block_size) == [1, qdata.shape[1]]
    if not rows or getattr(weight, "act_quant_kwargs", None) is not None:
        raise ValueError(f"{name}: only weight-only float8_e4m3fn weights with one scale per row can be saved")
    return qdata, scale.reshape(-1).float()


def _tinygemm_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(values 0-15 in pairs, uint8 [N, K / 2]; scales and zeros, fp32 [N, K / group]; group) of a tinygemm int4
    weight (torchao's ``Int4TilePackedTo4dTensor``). Its packing is the kernel's own, so the values are read back
    through the kernel: identity rows times the weight with unit scales and zero zeros give ``q - 8`` exactly."""
    N, K = weight.shape
    if getattr(weight, "act_pre_scale", None) is not None:
        raise ValueError("int4 weights with an activation pre-scale cannot be saved (only weight-only int4)")
    group = int(weight.block_size[-1])
    scale_and_zero = weight.scale_and_zero  # [K_pad / group, N_pad, 2] bf16
    k_pad = scale_and_zero.shape[0] * group
    unit = torch.zeros_like(scale_and_zero)
    unit[..., 0] = 1.0
    values = torch.empty(N, K, dtype=torch.uint8, device=scale_and_zero.device)
    for k0 in range(0, K, _UNPACK_COLUMNS):
        k1 = min(K, k0 + _UNPACK_COLUMNS)
        eye = torch.zeros(k1 - k0, k_pad, dtype=torch.bfloat16, device=values.device)
        eye[:, k0:k1] = torch.eye(k1 - k0, dtype=torch.bfloat16, device=values.device)
        q8 = torch.ops.aten._weight_int4pack_mm(eye, weight.qdata, group, unit)  # [k1 - k0, >= N]: q - 8
        values[:, k0:k1] = (q8[:, :N].T.float() + 8).to(torch.uint8)
    groups = K // group
    scale = scale_and_zero[:groups, :N, 0].T.float()
    zero = scale_and_zero[:groups, :N, 1].T.float()
    return _pairs(values), scale, zero, group


def _pairs(values: torch.Tensor) -> torch.Tensor:
    """uint8 values 0-15 [N, K] -> [N, K / 2], column 2i in the high nibble and 2i + 1 in the low one (tinygemm's
    input)."""
    return (values[:, ::2] << 4 | values[:, 1::2]).contiguous()


def _unpair(pairs: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_pairs`."""
    return torch.stack([pairs >> 4, pairs & 0xF], dim=-1).reshape(pairs.shape[0], -1)


# ---------------------------------------------------------------------------------------------- loading
def read_quantization(directory: Path) -> dict[str, Any] | None:
    """The ``quantization.json`` of a saved quantized model directory (None: a full-precision checkpoint)."""
    path = Path(directory) / QUANT_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    kinds = {"format": str, "mode": str, "quantized": list}
    bad = [f"{key} ({kind.__name__})" for key, kind in kinds.items() if not isinstance(doc.get(key), kind)]
    if not all(isinstance(name, str) for name in doc.get("quantized") or []):
        bad.append("quantized (a list of GEMM names)")
    if doc.get("int4") is not None and not isinstance(doc["int4"], dict):
        bad.append("int4 (an object of GEMM name -> group)")
    if bad:
        raise ValueError(f"{path}: missing or malformed {', '.join(bad)} (save the quantized model again)")
    fmt = FORMATS.get(doc["format"])
    if fmt is None or fmt[0] != doc.get("mode"):
        raise ValueError(
            f"{path}: unknown quantized format {doc.get('format')!r} for mode {doc.get('mode')!r} (this dia_fast reads "
            f"{', '.join(FORMATS)}; quantize the full-precision checkpoint again)"
        )
    return doc


def check_saved_device(doc: dict[str, Any], device: torch.device, source: str) -> None:
    """A one-line error when ``device`` cannot run the saved directory's format (the CUDA-only formats elsewhere)."""
    if doc["format"] in CUDA_ONLY_FORMATS and device.type != "cuda":
        instead = "quantize='int4'" if doc["mode"] == "int4" else "quantize='int8' or 'int4'"
        raise ValueError(
            f"{source} holds {doc['mode']} weights saved from CUDA ({doc['format']}), which load on CUDA only; on "
            f"{device.type}, load the full-precision checkpoint with {instead}"
        )


def _saved_kinds(doc: dict[str, Any]) -> tuple[dict[str, str], dict[str, int]]:
    """(GEMM name -> saved kind, int4 GEMM name -> group) of a quantization.json document."""
    _, int4_kind, other = FORMATS[doc["format"]]
    groups = dict(doc.get("int4") or {}) if int4_kind else {}
    bad = {name: g for name, g in groups.items() if type(g) is not int or g <= 0 or name not in doc["quantized"]}
    if bad:
        raise ValueError(f"bad int4 groups in {QUANT_FILE} (positive ints, for quantized GEMMs): {bad}")
    return {name: int4_kind if name in groups else other for name in doc["quantized"]}, groups


def load_saved(model: DiaModel, state: dict[str, torch.Tensor], doc: dict[str, Any], source: str) -> None:
    """Fill ``model`` (built on the meta device) from :func:`quantized_state`'s tensors and document: the
    full-precision ones are loaded strictly; the quantized GEMMs become :class:`Int8Linear` / :class:`Int4Linear`
    layers (CPU formats) or :class:`CudaOnlyGemm` holders holding the saved weights, scales and zeros."""
    try:
        kinds, groups = _saved_kinds(doc)
        cpu_kinds = {name: kind for name, kind in kinds.items() if kind in ("int8", "int4")}
        # placeholders on the meta device: the saved tensors are assigned below (no second copy is allocated)
        layers: dict[str, nn.Module] = install_cpu_layers(model, cpu_kinds, groups, device="meta")
        for name, kind in kinds.items():
            if name in cpu_kinds:
                continue
            lin = model.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"{name} is not a linear layer of this model")
            group = groups.get(name, 0)
            if kind == "int4z" and (group not in _TINYGEMM_GROUPS or lin.in_features % group):
                raise ValueError(
                    f"{name}: int4 group {group} must divide its {lin.in_features} columns and be one of "
                    f"{', '.join(map(str, _TINYGEMM_GROUPS))}"
                )
            layers[name] = CudaOnlyGemm(lin.in_features, lin.out_features, kind, group)
            _set_module(model, name, layers[name])
    except (ValueError, AttributeError) as exc:  # AttributeError: a GEMM name this model does not have
        raise ValueError(f"{source}: {exc}") from None
    keys = set()
    for name, layer in layers.items():
        kind = kinds[name]
        suffix, dtype, weight_shape = _WEIGHT[kind]
        names = [suffix, "weight_scale", *(["weight_zero"] if kind == "int4z" else [])]
        keys.update(f"{name}.{n}" for n in names)
        try:
            q, scale, *zero = (state.pop(f"{name}.{n}") for n in names)
        except KeyError as exc:
            raise ValueError(f"{source}: the quantized weights of {name} are missing ({exc})") from None
        i, o, g = layer.in_features, layer.out_features, getattr(layer, "group", 0)
        shape, scale_shape = weight_shape(i, o, g), _SCALE_SHAPE[kind](i, o, g)
        zero_ok = all(tuple(z.shape) == scale_shape for z in zero)
        if q.dtype != dtype or tuple(q.shape) != shape or tuple(scale.shape) != scale_shape or not zero_ok:
            raise ValueError(
                f"{source}: {name} must be {dtype} {shape} with {scale_shape} scales{' and zeros' * bool(zero)}, "
                f"got {q.dtype} {tuple(q.shape)} and {tuple(scale.shape)}"
                + (f" and zeros {tuple(zero[0].shape)}" if zero else "")
            )
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError(f"{source}: the scales of {name} must be positive and finite")
        if zero and not bool(torch.isfinite(zero[0]).all()):
            raise ValueError(f"{source}: the zeros of {name} must be finite")
        if isinstance(layer, CudaOnlyGemm):
            layer.weight, layer.weight_zero = q.contiguous(), (zero[0].float().contiguous() if zero else None)
        else:
            setattr(layer, suffix, q.contiguous())
        layer.weight_scale = scale.float().contiguous()
    # the full-precision tensors: floating point and finite, with the names and shapes the model expects
    check_weights(state, Path(source))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # mis-shaped: torch lists every one over many lines
        shapes = "; ".join(line.strip() for line in str(exc).splitlines()[1:] if line.strip())
        raise CheckpointError(f"{source} does not match the model config: {shapes}") from None
    missing = sorted(set(missing) - keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    model._dia_fast_quantized = doc["mode"]  # noqa: SLF001 - read by quantized_mode()


def cuda_from_saved(model: DiaModel, device: torch.device, dtype: torch.dtype, int8_kernel: str | None = None) -> None:
    """Turn the layers :func:`load_saved` put in ``model`` into the CUDA modes' layers on ``device`` holding the
    same values:

    * :class:`Int8Linear`: torchao's int8 weights (the same int8 values and fp32 row scales), or left as it is with
      ``int8_kernel="dia_fast"`` (the caller moves it);
    * :class:`Int4Linear` (symmetric int4): tinygemm's weights with q = the saved value + 8 and zero 0, the scales
      rounded to bf16 (the one difference from the CPU's numbers);
    * :class:`CudaOnlyGemm`: int4 with zero points as tinygemm's weights with the saved values, scales and zeros
      (exactly: they were bf16); fp8 as torchao's fp8 weights with the saved values and row scales."""
    keep_int8 = _int8_kernel(int8_kernel) == "dia_fast"
    for name, layer in list(model.named_modules()):
        if isinstance(layer, Int8Linear) and not keep_int8:
            weight = _torchao_int8(layer.weight_int8.to(device), layer.weight_scale.to(device), dtype)
        elif isinstance(layer, Int4Linear):
            values = (unpack_int4(layer.weight_int4).to(torch.int16) + 8).to(torch.uint8)
            zero = torch.zeros_like(layer.weight_scale)
            weight = _tinygemm_weight(values, layer.weight_scale, zero, layer.group, device)
        elif isinstance(layer, CudaOnlyGemm) and layer.kind == "int4z":
            weight = _tinygemm_weight(_unpair(layer.weight), layer.weight_scale, layer.weight_zero, layer.group, device)
        elif isinstance(layer, CudaOnlyGemm):
            weight = _torchao_fp8(layer.weight.to(device), layer.weight_scale.to(device), dtype)
        else:
            continue
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        _set_module(model, name, linear)


def _torchao_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from torchao.quantization import Int8Tensor

    rows = scale.float().reshape(-1, 1)
    return Int8Tensor(q, rows, [1, q.shape[1]], dtype, zero_point=torch.zeros_like(rows, dtype=torch.int8))


def _torchao_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torchao's fp8 weight-only tensor as ``Float8WeightOnlyConfig`` makes it (per-row scales [out, 1])."""
    from torchao.quantization import Float8Tensor

    return Float8Tensor(q, scale.float().reshape(-1, 1), block_size=[1, q.shape[1]], dtype=dtype)


def _tinygemm_weight(
    values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int, device: torch.device
) -> torch.Tensor:
    """tinygemm's int4 weight (``W = (q - 8) * scale + zero`` per group) from ``values`` (uint8 q in 0-15 [N, K]) and
    fp32 ``scale`` / ``zero`` [N, K / group], packed as torchao's ``Int4TilePackedTo4dTensor.from_hp`` packs: rows
    padded to a multiple of 8 and columns to a multiple of 1024 (zero weights: value 8, scale 1), column pairs in a
    byte (even column high), then ``aten._convert_weight_to_int4pack`` with 8 inner k-tiles; scales and zeros
    [in / group, out, 2] bf16."""
    from torchao.quantization import Int4TilePackedTo4dTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    N, K = values.shape
    if group not in _TINYGEMM_GROUPS:
        raise ValueError(f"int4 on CUDA takes groups of {', '.join(map(str, _TINYGEMM_GROUPS))} columns, got {group}")
    n_pad, k_pad = -N % 8, -K % 1024
    u = torch.nn.functional.pad(values, (0, k_pad, 0, n_pad), value=8).to(device)
    qdata = torch.ops.aten._convert_weight_to_int4pack(_pairs(u), 8)
    scales = torch.nn.functional.pad(scale.float(), (0, k_pad // group, 0, n_pad), value=1.0)
    zeros = torch.nn.functional.pad(zero.float(), (0, k_pad // group, 0, n_pad), value=0.0)
    scales = scales.to(device=device, dtype=torch.bfloat16)
    zeros = zeros.to(device=device, dtype=torch.bfloat16)
    scale_and_zero = pack_tinygemm_scales_and_zeros(scales, zeros, torch.bfloat16)
    return Int4TilePackedTo4dTensor(qdata, scale_and_zero, [1, group], torch.Size([N, K]))

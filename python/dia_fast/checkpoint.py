"""Loading and saving Dia weights in the two published layouts.

- **transformers** (``DiaForConditionalGeneration.save_pretrained``): ``config.json`` +
  ``model.safetensors`` (possibly sharded), ``nn.Linear`` weights, keys under ``model.`` and a
  top-level ``logits_dense.weight``.
- **official nari-labs** (``dia`` package): ``config.json`` (v0.1 or current) + ``model.safetensors``
  or a ``.pth`` state dict, DenseGeneral kernels shaped ``in_dims + out_dims`` and one embedding per
  channel (``decoder.embeddings.{c}.weight``).

Both are converted to dia_fast's layout (transformers' names without the ``model.`` prefix).
Loading is strict: missing, unexpected or mis-shaped keys raise :class:`CheckpointError` naming them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .config import DiaConfig

Tensors = dict[str, torch.Tensor]

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "dia-v0_1.pth", "model.pth")
SHARD_INDEX = "model.safetensors.index.json"  # a sharded checkpoint's index: preferred to the files above


# Safetensors metadata that DiaTTS.save_pretrained writes for a random-weight model (DiaTTS.random): loading it back
# says so, and the CLI treats it as the demo model it is. A saved random codec (the demo codec) carries it too.
RANDOM_WEIGHTS_KEY = "dia_fast.random_weights"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into."""


# ---------------------------------------------------------------------------------------------- files


def find_weights(directory: Path) -> list[Path]:
    """Weight files of a checkpoint directory: one file, or the shards of an index."""
    index = directory / SHARD_INDEX
    if index.exists():
        return _index_shards(index)
    for name in WEIGHT_FILES:
        if (directory / name).exists():
            return [directory / name]
    found = (
        sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.pth")) or sorted(directory.glob("*.bin"))
    )
    if len(found) == 1:
        return found
    if not found:
        raise CheckpointError(f"{directory}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")
    raise CheckpointError(f"{directory}: several weight files and no index: {[p.name for p in found]}")


def _index_shards(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names; :class:`CheckpointError` naming the index when it is not
    JSON, has no ``weight_map`` of file names, or names a shard that is not there."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:  # (AttributeError: JSON, not an object)
        raise CheckpointError(
            f"{index}: not a readable shard index (expected a JSON object with 'weight_map'): {exc}"
        ) from None
    values = list(weight_map.values()) if isinstance(weight_map, dict) else []
    names = set(values) if all(isinstance(n, str) for n in values) else set()  # (a list as a value is unhashable)
    if not names or not all(n and Path(n).name == n for n in names):
        raise CheckpointError(f"{index}: no 'weight_map' of tensor name -> shard file name in the shard index")
    shards = [index.parent / name for name in sorted(names)]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise CheckpointError(f"{index}: names shard files that are not in {index.parent}: {', '.join(missing)}")
    return shards


def read_tensors(path: Path) -> Tensors:
    """Read a safetensors file or a torch pickle holding a state dict (``weights_only``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return check_weights(load_file(str(path)), path)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read as a torch state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not hold a flat state dict of tensors")
    return check_weights(obj, path)


def check_weights(tensors: Tensors, path: str | Path) -> Tensors:
    """Every weight must be floating point and finite: a one-line :class:`CheckpointError` naming the file and the
    first tensor that is not (a NaN weight would otherwise give seconds of constant audio, silently)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name} is {str(t.dtype).replace('torch.', '')}, not floating point")
        flat = t.reshape(-1)
        step = 1 << 22  # isfinite's temporaries are several times the tensor: check a slice at a time
        if not all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step)):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
    return tensors


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _safetensors_header(f: BinaryIO, path: Path, metadata: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
    """(header, offset of the data) of an open safetensors file; its ``__metadata__`` goes into ``metadata``."""
    size = f.seek(0, 2)
    f.seek(0)
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or 8 + n > size:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): bad header size")
    try:
        header = json.loads(f.read(n))
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): bad header")
    meta = header.pop("__metadata__", None)
    if metadata is not None and isinstance(meta, dict):
        metadata.update(meta)
    for name, info in header.items():
        ok = isinstance(info, dict) and isinstance(info.get("shape"), list)
        begin, end = info.get("data_offsets", (0, -1)) if ok else (0, -1)
        if not ok or info.get("dtype") not in _SAFETENSORS_DTYPES or not 0 <= begin <= end or 8 + n + end > size:
            raise CheckpointError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): tensor {name} is out of bounds "
                "or of an unknown dtype"
            )
    return header, 8 + n


def iter_tensors(paths: Iterable[Path], *, check: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the weight files one tensor at a time, each checked as :func:`check_weights` does
    (``check=False``: not checked, e.g. a quantized directory's integer tensors, which its loader checks).
    A safetensors file is read with plain reads, one tensor after the other (a memory map would count the whole
    file in the process's resident memory): only the tensor being handled is in memory. A ``.pth`` is read at
    once."""
    for path in paths:
        path = Path(path)
        if path.suffix != ".safetensors":
            yield from read_tensors(path).items()
            continue
        with open(path, "rb") as f:
            header, data = _safetensors_header(f, path)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                begin, end = info["data_offsets"]
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                if math.prod(shape) * dtype.itemsize != end - begin:
                    raise CheckpointError(f"{path}: tensor {name} holds {end - begin} bytes, not {shape} of {dtype}")
                raw = torch.empty(end - begin, dtype=torch.uint8)  # read straight into the tensor's memory
                f.seek(data + begin)
                if f.readinto(memoryview(raw.numpy())) != end - begin:
                    raise CheckpointError(f"{path}: not a readable safetensors file (truncated?): tensor {name}")
                held = [raw.view(dtype).reshape(shape)]
                del raw
                if check:  # (it may cast: float64 becomes float32)
                    held.append(check_weights({name: held.pop()}, path)[name])
                # handed over without a reference left here: while the caller converts and quantizes it, this
                # frame holds nothing (one tensor in memory at a time, plus what the caller makes of it)
                yield name, held.pop()


def safetensors_keys(paths: Iterable[Path]) -> list[str] | None:
    """The tensor names of safetensors weight files, from their headers (None: not all are safetensors)."""
    paths = [Path(p) for p in paths]
    if not all(p.suffix == ".safetensors" for p in paths):
        return None
    keys: list[str] = []
    for path in paths:
        with open(path, "rb") as f:
            keys.extend(_safetensors_header(f, path)[0])
    return keys


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a checkpoint's safetensors weight files (a directory or one file), merged; empty for
    other formats and for paths that are not local."""
    p = Path(path).expanduser()
    if not p.exists():
        return {}
    files = find_weights(p) if p.is_dir() else [p]
    metadata: dict[str, str] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with open(file, "rb") as f:
                _safetensors_header(f, file, metadata)
    return metadata


def has_random_weights(path: str | Path) -> bool:
    """Whether ``path`` holds weights that dia_fast saved from a random-weight demo model
    (:data:`RANDOM_WEIGHTS_KEY` in the safetensors metadata)."""
    return safetensors_metadata(path).get(RANDOM_WEIGHTS_KEY) == "true"


def random_weights_metadata(module: object) -> dict[str, str]:
    """The safetensors metadata for saving ``module``: marked as random (:data:`RANDOM_WEIGHTS_KEY`) when its
    ``random_weights`` attribute says so (a codec made by :func:`dia_fast.codec.random_codec`, or loaded from one
    saved marked)."""
    return {"format": "pt", **({RANDOM_WEIGHTS_KEY: "true"} if getattr(module, "random_weights", False) else {})}


def read_all(paths: Iterable[Path]) -> Tensors:
    tensors: Tensors = {}
    for p in paths:
        tensors.update(read_tensors(p))
    return tensors


# ---------------------------------------------------------------------------------------------- layouts


def detect_layout(state: Tensors) -> str:
    """``"transformers"``, ``"official"`` or ``"dia_fast"``."""
    keys = state.keys()
    if any(k.startswith("model.") for k in keys) or "logits_dense.weight" in keys:
        return "transformers"
    if "decoder.embeddings.0.weight" in keys:
        return "official"
    if "decoder.embeddings.embed.weight" in keys:
        return "dia_fast"
    raise CheckpointError(
        "unrecognised checkpoint layout: expected transformers keys ('model.encoder...'), official nari-labs "
        "keys ('decoder.embeddings.0.weight', ...) or dia_fast keys"
    )


def from_transformers(state: Tensors) -> Tensors:
    out: Tensors = {}
    for k, v in state.items():
        if k == "logits_dense.weight":
            out["decoder.logits_dense.weight"] = v
        elif k.startswith("model."):
            out[k[len("model.") :]] = v
        else:
            out[k] = v  # left for the strict check to report
    return out


def to_transformers(state: Tensors) -> Tensors:
    """dia_fast state dict -> transformers ``DiaForConditionalGeneration`` keys."""
    return {
        ("logits_dense.weight" if k == "decoder.logits_dense.weight" else f"model.{k}"): v for k, v in state.items()
    }


_DENSE = re.compile(r"\.(self_attention|cross_attention)\.(q_proj|k_proj|v_proj|o_proj)\.weight$")


def from_official(state: Tensors) -> Tensors:
    """Official DenseGeneral kernels -> ``nn.Linear`` (out, in) weights."""
    out: Tensors = {}
    embeds: dict[int, torch.Tensor] = {}
    for k, w in state.items():
        try:
            m = re.fullmatch(r"decoder\.embeddings\.(\d+)\.weight", k)
            if m:
                embeds[int(m.group(1))] = w
            elif _DENSE.search(k):
                if k.endswith("o_proj.weight"):  # (H, D, out)
                    out[k] = w.reshape(w.shape[0] * w.shape[1], -1).t().contiguous()
                else:  # (in, H, D)
                    out[k] = w.reshape(w.shape[0], -1).t().contiguous()
            elif k.endswith(".mlp.wi_fused.weight"):  # (in, 2, I): [gate | up]
                out[k.replace("wi_fused", "gate_up_proj")] = w.reshape(w.shape[0], -1).t().contiguous()
            elif k.endswith(".mlp.wo.weight"):  # (I, out)
                out[k.replace(".wo.", ".down_proj.")] = w.t().contiguous()
            elif k == "decoder.logits_dense.weight":  # (D, C, V)
                out[k] = w.reshape(w.shape[0], -1).t().contiguous()
            else:
                out[k] = w
        except IndexError as exc:  # a kernel of too few dimensions (what else goes wrong here is not the file's)
            shape = tuple(w.shape)
            raise CheckpointError(f"{k}: not an official DenseGeneral kernel of shape {shape} ({exc})") from None
    if embeds:
        if sorted(embeds) != list(range(len(embeds))):
            raise CheckpointError(f"decoder.embeddings: channels {sorted(embeds)} are not 0..{len(embeds) - 1}")
        out["decoder.embeddings.embed.weight"] = torch.cat([embeds[i] for i in range(len(embeds))], dim=0)
    return out


def to_official(state: Tensors, config: DiaConfig) -> Tensors:
    """dia_fast state dict -> the official nari-labs layout (DenseGeneral kernels)."""
    enc, dec = config.model.encoder, config.model.decoder
    C, V = config.data.channels, dec.vocab_size
    out: Tensors = {}
    for k, w in state.items():
        m = _DENSE.search(k)
        if m:
            kind, proj = m.groups()
            if k.startswith("encoder."):
                heads, hd = (enc.n_kv_head if proj in ("k_proj", "v_proj") else enc.n_head), enc.head_dim
            elif kind == "self_attention":
                heads, hd = (dec.n_kv_head if proj in ("k_proj", "v_proj") else dec.n_head), dec.head_dim
            else:
                heads = dec.cross_n_kv_head if proj in ("k_proj", "v_proj") else dec.cross_n_head
                hd = dec.cross_head_dim
            if proj == "o_proj":
                out[k] = w.t().reshape(heads, hd, -1).contiguous()
            else:
                out[k] = w.t().reshape(-1, heads, hd).contiguous()
        elif k.endswith(".mlp.gate_up_proj.weight"):
            out[k.replace("gate_up_proj", "wi_fused")] = w.t().reshape(w.shape[1], 2, -1).contiguous()
        elif k.endswith(".mlp.down_proj.weight"):
            out[k.replace(".down_proj.", ".wo.")] = w.t().contiguous()
        elif k == "decoder.logits_dense.weight":
            out[k] = w.t().reshape(-1, C, V).contiguous()
        elif k == "decoder.embeddings.embed.weight":
            for c, chunk in enumerate(w.split(V, dim=0)):
                out[f"decoder.embeddings.{c}.weight"] = chunk.contiguous()
        else:
            out[k] = w
    return out


def iter_internal(items: Iterable[tuple[str, torch.Tensor]], layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`to_internal` one tensor at a time (the official layout's per-channel embeddings, small, are joined
    at the end)."""
    embeds: Tensors = {}
    converter = {"transformers": from_transformers, "official": from_official}.get(layout)
    for key, tensor in items:
        if layout == "official" and re.fullmatch(r"decoder\.embeddings\.\d+\.weight", key):
            embeds[key] = tensor
            continue
        converted = converter({key: tensor}) if converter else {key: tensor}
        del tensor
        while converted:  # handed on without keeping a reference here
            yield converted.popitem()
    if embeds:
        yield from from_official(embeds).items()


def load_config_and_tensors(
    path_or_id: str | Path, config: DiaConfig | None = None
) -> tuple[DiaConfig, Iterator[tuple[str, torch.Tensor]], str]:
    """(config, dia_fast-layout ``(name, tensor)`` pairs one at a time, detected layout) of a directory or a weights
    file. The layout is detected from the names alone for safetensors files, which are read lazily; a ``.pth``
    is read at once."""
    p = resolve_path(path_or_id)
    files = find_weights(p) if p.is_dir() else [p]
    cfg_file = (p if p.is_dir() else p.parent) / "config.json"
    if config is None:
        if not cfg_file.exists():
            raise CheckpointError(
                f"no config.json next to {p}: put the checkpoint's config.json beside it (or pass config= in Python)"
            )
        config = DiaConfig.from_json(cfg_file)
    keys = safetensors_keys(files)
    if keys is None:  # a torch pickle: read at once anyway
        raw = read_all(files)
        layout = detect_layout(raw)
        return config, iter_internal(raw.items(), layout), layout
    layout = detect_layout(dict.fromkeys(keys))
    return config, iter_internal(iter_tensors(files), layout), layout


def to_internal(state: Tensors) -> Tensors:
    layout = detect_layout(state)
    if layout == "transformers":
        return from_transformers(state)
    if layout == "official":
        return from_official(state)
    return dict(state)


# ---------------------------------------------------------------------------------------------- strict load


def check_state_dict(expected: dict[str, torch.Size], state: Tensors, source: str) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected and mis-shaped keys."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or shapes):
        return

    def fmt(items: list[str]) -> str:
        head = ", ".join(items[:8])
        return head + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {fmt(unexpected)}")
    if shapes:
        parts.append(f"mis-shaped keys: {fmt(shapes)}")
    raise CheckpointError(f"{source} does not match the model config; " + "; ".join(parts))


def local_config(path_or_id: str | Path) -> DiaConfig | None:
    """The config of a local checkpoint (a directory, or the folder of a weights file), read without its weights;
    None where there is no local ``config.json`` (a hub id, a missing path). A config that cannot be read raises
    (:class:`~dia_fast.config.ConfigError` / ``OSError``), naming the file."""
    path = Path(path_or_id).expanduser()
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not path.exists() or not config.is_file():
        return None
    return DiaConfig.from_json(config)


def is_hub_id(text: str) -> bool:
    """Whether ``text`` has the form of a Hugging Face hub id (``owner/name``)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.startswith((".", "/"))


def resolve_path(path_or_id: str | Path) -> Path:
    """A local file/directory, or a hub id downloaded with ``huggingface_hub`` when it can be reached."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        return p
    text = str(path_or_id)
    if is_hub_id(text):
        try:
            from huggingface_hub import snapshot_download
        except ImportError as exc:
            raise CheckpointError(
                f"{text!r} is not a local path, and huggingface_hub is not installed to fetch it from the hub "
                "(pip install huggingface_hub)"
            ) from exc
        try:
            local = snapshot_download(
                text,
                allow_patterns=[
                    "config.json",
                    "*/config.json",  # (a saved codec's)
                    "quantization.json",  # (a saved quantized model's)
                    "*.safetensors",
                    "*.safetensors.index.json",
                    "*.pth",
                ],
            )
        except Exception as exc:
            raise CheckpointError(
                f"{text!r} is not a local path and could not be fetched from the Hugging Face hub "
                f"({type(exc).__name__}: {exc}). Download it where the hub is reachable and pass the directory."
            ) from exc
        return Path(local)
    raise FileNotFoundError(f"checkpoint not found: {path_or_id}")


def fill_model(
    model: torch.nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    source: str,
    sinks: dict[str, tuple[torch.Size, Callable[[torch.Tensor], None]]] | None = None,
) -> None:
    """Fill a model built on the meta device from dia_fast-layout ``(name, tensor)`` pairs, one tensor at a time:
    its parameters get their own storage in ``dtype`` (the norm weights: fp32) on the CPU and each arriving tensor is
    copied into its place (the self-attention's q, k and v into their rows of the fused QKV weight), then dropped.
    ``sinks``: names handled by a callable instead, with the shape they must have (quantizing loaders). Strict:
    missing, unexpected and mis-shaped tensors raise one :class:`CheckpointError`, after the whole checkpoint was
    read."""
    from .model.layers import RMSNorm

    sinks = dict(sinks or {})
    for pname, param in list(model.named_parameters()):
        owner, _, attr = pname.rpartition(".")
        module = model.get_submodule(owner)
        # norm weights stay fp32 whatever ``dtype`` (the norms compute in fp32): the checkpoint's values, not rounded
        kind = torch.float32 if isinstance(module, RMSNorm) else dtype
        setattr(module, attr, torch.nn.Parameter(torch.empty(param.shape, dtype=kind), requires_grad=False))
    dest = dict(model.published_parameters())  # the q/k/v entries are views into the fused weight
    expected = {k: v.shape for k, v in dest.items()} | {k: shape for k, (shape, _) in sinks.items()}
    seen: dict[str, torch.Tensor] = {}
    for key, tensor in tensors:
        seen[key] = torch.empty(tensor.shape, device="meta")
        if key not in expected or tuple(tensor.shape) != tuple(expected[key]):
            continue  # reported below with the others
        with torch.no_grad():
            if key in sinks:
                sinks[key][1](tensor)
            else:
                dest[key].copy_(tensor)
        del tensor
    check_state_dict(expected, seen, source)

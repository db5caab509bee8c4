"""Audio codecs: the :class:`AudioCodec` protocol, DAC 44.1 kHz and EnCodec 24 kHz."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .base import AudioCodec

__all__ = ["AudioCodec", "check_codec_spec", "codec_kind", "load_codec"]

_DEMO_WARNING = (
    "no codec checkpoint given: using a small random {kind} codec, so the audio is a demonstration, not speech "
    "(pass a codec checkpoint: descript's DAC 44.1 kHz weights, or an EnCodec 24 kHz checkpoint)"
)
# a codec checkpoint saved from the random codec (marked in its safetensors metadata)
_SAVED_DEMO_WARNING = (
    "{path} holds a random codec (saved from dia_fast's demo codec), so the audio is a demonstration, not speech "
    "(pass a real codec checkpoint: descript's DAC 44.1 kHz weights, or an EnCodec 24 kHz checkpoint)"
)


def codec_kind(path: Path) -> str:
    """``"dac"`` or ``"encodec"`` for a codec checkpoint directory or file."""
    cfg = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if cfg.exists():
        try:
            model_type = json.loads(cfg.read_text()).get("model_type", "")
        except json.JSONDecodeError:
            model_type = ""
        if model_type in ("dac", "encodec"):
            return model_type
    # the encodec package saves .th files (descript's DAC: weights.pth)
    if path.suffix == ".th" or (path.is_dir() and any(path.glob("*.th"))):
        return "encodec"
    return "encodec" if "encodec" in path.name.lower() else "dac"


def random_codec(kind: str, seed: int = 0) -> AudioCodec:
    """A small random codec of ``kind`` (``"dac"`` or ``"encodec"``) for tests and the demo, marked as random
    (``random_weights``: its ``save_pretrained`` marks the saved weights, and loading them back warns)."""
    if kind == "dac":
        from .dac import DacCodec

        codec: AudioCodec = DacCodec.random("tiny", seed=seed)
    elif kind == "encodec":
        from .encodec import EncodecCodec

        codec = EncodecCodec.random("tiny", seed=seed)
    else:
        raise ValueError(f"unknown codec {kind!r}; expected 'dac' or 'encodec'")
    codec.random_weights = True  # type: ignore[attr-defined]
    return codec


def check_codec_spec(spec: object) -> None:
    """What :func:`load_codec` accepts, checked without loading anything: an :class:`AudioCodec`, a non-empty
    checkpoint path, ``"dac"`` / ``"encodec"``, or None; a TypeError / ValueError naming ``codec`` otherwise."""
    if spec is None or isinstance(spec, Path):
        return
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("codec is an empty path: give a codec checkpoint path, 'dac', 'encodec' or None")
        return
    if not isinstance(spec, AudioCodec):
        raise TypeError(f"codec must be an AudioCodec, a codec checkpoint path, 'dac', 'encodec' or None, got {spec!r}")


def load_codec(
    spec: AudioCodec | str | Path | None,
    *,
    device: torch.device | str = "cpu",
    search_dir: Path | None = None,
    warn_demo: bool = True,
) -> AudioCodec:
    """Resolve a codec: an instance; a checkpoint path (DAC or EnCodec, detected); ``"dac"`` or
    ``"encodec"`` (a random demo codec, with a warning); or None (a ``dac/`` or ``codec/``
    directory inside ``search_dir`` when there is one, else the random demo DAC). A checkpoint saved from a random
    codec warns as the random codec does (``warn_demo=False``: neither warns)."""
    check_codec_spec(spec)
    if spec is not None and not isinstance(spec, (str, Path)):
        return spec
    if spec is None and search_dir is not None:
        for sub in ("dac", "codec", "audio_tokenizer"):
            if (search_dir / sub).is_dir():
                spec = search_dir / sub
                break
    if spec is None or (isinstance(spec, str) and spec.lower() in ("dac", "encodec")):
        kind = "dac" if spec is None else str(spec).lower()
        if warn_demo:
            warnings.warn(_DEMO_WARNING.format(kind=kind.upper() if kind == "dac" else "EnCodec"), stacklevel=3)
        codec = random_codec(kind)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"codec checkpoint not found: {path}")
        if codec_kind(path) == "encodec":
            from .encodec import EncodecCodec

            codec = EncodecCodec.from_pretrained(path)
        else:
            from .dac import DacCodec

            codec = DacCodec.from_pretrained(path)
        if warn_demo and getattr(codec, "random_weights", False):
            warnings.warn(_SAVED_DEMO_WARNING.format(path=path), stacklevel=3)
    return codec.to(device) if isinstance(codec, torch.nn.Module) else codec

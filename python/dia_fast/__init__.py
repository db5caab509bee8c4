"""dia_fast: the fastest way to run the Dia text-to-speech model from Python.

>>> import dia_fast
>>> tts = dia_fast.DiaTTS.random("tiny", seed=0)           # or DiaTTS.from_pretrained(path)
>>> result = tts.generate("[S1] Hello there. [S2] Hi!", max_new_tokens=64)
>>> result.audio[0].shape, result.sample_rate
"""

from __future__ import annotations

from ._version import __version__
from .config import ConfigError, DataConfig, DecoderConfig, DiaConfig, EncoderConfig, ModelConfig
from .info import info

__all__ = [
    "Audio",
    "ConfigError",
    "Conversation",
    "CustomSpeaker",
    "DataConfig",
    "DecoderConfig",
    "DiaConfig",
    "DiaTTS",
    "EncoderConfig",
    "GenerationResult",
    "ModelConfig",
    "Speaker",
    "VoicePool",
    "__version__",
    "info",
]


def __getattr__(name: str):  # lazy: keep `import dia_fast` light
    if name in ("DiaTTS", "GenerationResult"):
        from . import api

        return getattr(api, name)
    if name in ("Audio", "Conversation", "CustomSpeaker", "Speaker", "VoicePool"):
        from . import voice

        return getattr(voice, name)
    raise AttributeError(f"module 'dia_fast' has no attribute {name!r}")

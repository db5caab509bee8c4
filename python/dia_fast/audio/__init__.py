"""Audio in and out of dia_fast: file I/O, soxr resampling, BS.1770 loudness, PCM, crossfades.

Everything here works on numpy arrays on the CPU (mono float32 [N] unless said otherwise);
torch tensors are accepted where noted but torch is never needed.
"""

from __future__ import annotations

from .io import (
    AUDIO_FORMATS,
    MAX_RATES,
    AudioFormatError,
    AudioTooLongError,
    audio_format_for,
    load_prompt_audio,
    read_audio,
    write_audio,
    write_wav,
)
from .join import check_crossfade_ms, crossfade_join
from .loudness import LoudnessGain, integrated_loudness, loudness_gain, normalize_loudness
from .pcm import cpp_pcm_available, float_to_pcm16
from .resample import resample

__all__ = [
    "AUDIO_FORMATS",
    "MAX_RATES",
    "AudioFormatError",
    "AudioTooLongError",
    "audio_format_for",
    "check_crossfade_ms",
    "LoudnessGain",
    "cpp_pcm_available",
    "crossfade_join",
    "float_to_pcm16",
    "integrated_loudness",
    "load_prompt_audio",
    "loudness_gain",
    "normalize_loudness",
    "read_audio",
    "resample",
    "write_audio",
    "write_wav",
]

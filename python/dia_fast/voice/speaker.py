"""Voices: the built-in ``Speaker.S1`` / ``Speaker.S2`` and ``CustomSpeaker`` (a cloned voice).

A custom speaker is an audio prompt encoded once into codec codes plus its transcript: the
"speaker embedding" Dia is conditioned on. It is saved as safetensors (the codes tensor, and
the transcript, codec description and dia_fast version as metadata) and checked on load.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._version import __version__
from ..audio.io import write_file_bytes
from ..text import SPEAKER_TAG_RE as _TAG_RE

if TYPE_CHECKING:
    from ..api import DiaTTS
    from .pool import VoicePool

__all__ = ["CustomSpeaker", "Speaker", "SpeakerFileError", "codec_description"]

FORMAT = "dia_fast.speaker"
FORMAT_VERSION = "1"


class SpeakerFileError(ValueError):
    """A speaker file that is not a valid dia_fast speaker, or one made with another codec."""


class Speaker(str, Enum):
    """Dia's built-in voices: the ``[S1]`` and ``[S2]`` tags, with no audio prompt."""

    S1 = "[S1]"
    S2 = "[S2]"

    @property
    def tag(self) -> str:
        return self.value

    @property
    def index(self) -> int:
        """0 for S1, 1 for S2 (the slot in a conversation's speaker list)."""
        return 0 if self is Speaker.S1 else 1

    @classmethod
    def parse(cls, value: object) -> Speaker:
        """A ``Speaker`` from itself, ``"[S1]"``, ``"S1"``/``"s1"`` or the slot index 0 / 1."""
        if isinstance(value, Speaker):
            return value
        if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            if value in (0, 1):
                return cls.S1 if value == 0 else cls.S2
            raise ValueError(f"speaker index must be 0 ([S1]) or 1 ([S2]), got {value}")
        if isinstance(value, str):
            key = value.strip().upper().strip("[]")
            if key in ("S1", "S2"):
                return cls.S1 if key == "S1" else cls.S2
        raise ValueError(f"unknown speaker {value!r}: use Speaker.S1/S2, '[S1]'/'[S2]' or 0/1")


def _tts_of(pool_or_tts: VoicePool | DiaTTS) -> DiaTTS:
    tts = getattr(pool_or_tts, "tts", pool_or_tts)
    if not hasattr(tts, "encode_prompt") or not hasattr(tts, "codec"):
        raise TypeError(f"expected a VoicePool or DiaTTS, got {type(pool_or_tts).__name__}")
    return tts


_CODEC_NUMBERS = ("sample_rate", "n_codebooks", "codebook_size", "hop_length")


def codec_description(codec: Any) -> dict[str, str]:
    """What a speaker's codes depend on: codec kind, sample rate, codebooks and their size, hop."""
    name = type(codec).__name__.lower()
    kind = "encodec" if "encodec" in name else "dac" if "dac" in name else name
    return {
        "codec": kind,
        "sample_rate": str(int(codec.sample_rate)),
        "n_codebooks": str(int(codec.n_codebooks)),
        "codebook_size": str(int(codec.codebook_size)),
        "hop_length": str(int(codec.hop_length)),
    }


@dataclass(frozen=True, eq=False)
class CustomSpeaker:
    """A cloned voice: prompt ``codes`` [T, n_codebooks] (int64, CPU) and their ``transcript``.

    ``transcript`` is what the prompt says. Without ``[S1]``/``[S2]`` tags it is one speaker's
    words and gets the tag of the slot the speaker fills in a conversation; with tags it is
    used as written. ``codec`` describes the codec the codes belong to (see
    :func:`codec_description`).
    """

    codes: torch.Tensor
    transcript: str
    codec: dict[str, str]
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.transcript, str) or not self.transcript.strip():
            raise ValueError("a custom speaker needs the transcript of its audio prompt")
        if self.codes.ndim != 2 or self.codes.dtype != torch.long or self.codes.shape[0] == 0:
            raise ValueError(f"speaker codes must be a non-empty int64 [T, C] tensor, got {tuple(self.codes.shape)}")
        if not isinstance(self.name, str):
            raise TypeError(f"a speaker's name must be a str, got {type(self.name).__name__}")
        given: dict[str, int] = {}
        for key in _CODEC_NUMBERS:  # (what the codec description holds of them: whole numbers > 0)
            if key in self.codec:
                value = str(self.codec[key])
                if not value.isdecimal() or int(value) <= 0:
                    raise ValueError(f"the codec's {key} must be a whole number > 0, got {self.codec[key]!r}")
                given[key] = int(value)
        if "n_codebooks" in given and self.codes.shape[1] != given["n_codebooks"]:
            raise ValueError(f"speaker codes have {self.codes.shape[1]} codebooks, the codec {given['n_codebooks']}")
        if "codebook_size" in given and (int(self.codes.min()) < 0 or int(self.codes.max()) >= given["codebook_size"]):
            raise ValueError(f"speaker codes outside the codebook 0..{given['codebook_size'] - 1}")

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_audio(
        cls,
        path_or_array: Any,
        transcript: str,
        pool: VoicePool | DiaTTS,
        sample_rate: int | None = None,
        *,
        name: str = "",
    ) -> CustomSpeaker:
        """Encode an audio prompt (a file, or samples at ``sample_rate``; 5-10 s is best) once.

        ``transcript``: exactly what is said in the prompt. Raises ``ValueError`` for an empty
        transcript and for empty, silent or too long audio.
        """
        if not isinstance(transcript, str) or not transcript.strip():
            raise ValueError("a custom speaker needs the transcript of its audio prompt")
        tts = _tts_of(pool)
        codes = tts.encode_prompt(path_or_array, sample_rate)
        return cls(codes.to("cpu", torch.long).contiguous(), transcript.strip(), codec_description(tts.codec), name)

    def tagged_transcript(self, slot: int) -> str:
        """The transcript as the model reads it when this voice fills ``slot`` (0 = [S1], 1 = [S2])."""
        if _TAG_RE.search(self.transcript):
            return self.transcript
        return f"{Speaker.parse(slot).tag} {self.transcript}"

    @property
    def frames(self) -> int:
        return int(self.codes.shape[0])

    def check_compatible(self, pool: VoicePool | DiaTTS) -> None:
        """Raise :class:`SpeakerFileError` if these codes were made with another codec than the pool's."""
        expected = codec_description(_tts_of(pool).codec)
        diff = {k: (self.codec.get(k), v) for k, v in expected.items() if self.codec.get(k) != v}
        if self.codes.shape[1] != int(expected["n_codebooks"]):  # (the codes themselves, not only what they claim)
            diff["codes' codebooks"] = (str(self.codes.shape[1]), expected["n_codebooks"])
        if diff:
            details = ", ".join(f"{k}: speaker {a} vs model {b}" for k, (a, b) in diff.items())
            raise SpeakerFileError(
                f"speaker {self.name or '(unnamed)'} was encoded with another codec ({details}); "
                "re-create it with CustomSpeaker.from_audio for this model"
            )

    # ------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file (atomically: temp file + rename; :func:`~dia_fast.audio.io.write_file_bytes`);
        returns the path. A failure is an ``OSError`` naming ``path``."""
        from safetensors.torch import save

        dest = Path(path)
        metadata = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dia_fast_version": __version__,
            "transcript": self.transcript,
            "name": self.name,
            **self.codec,
        }
        if dest.is_dir():
            raise IsADirectoryError(f"cannot write the speaker file {dest}: it is a directory")
        return write_file_bytes(dest, save({"codes": self.codes.detach().cpu().contiguous()}, metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, pool: VoicePool | DiaTTS | None = None) -> CustomSpeaker:
        """Read a file written by :meth:`save`, validated; with ``pool``, also checked against its codec.

        Raises ``FileNotFoundError`` or :class:`SpeakerFileError` (a ``ValueError``) saying what is wrong.
        """
        from safetensors import SafetensorError, safe_open

        src = Path(path)
        if not src.is_file():
            raise FileNotFoundError(f"speaker file not found: {src}")
        try:
            with safe_open(str(src), framework="pt") as fh:
                metadata = fh.metadata() or {}
                keys = set(fh.keys())
                codes = fh.get_tensor("codes") if "codes" in keys else None
        except (SafetensorError, OSError, ValueError) as exc:
            raise SpeakerFileError(f"{src} is not a safetensors file: {exc}") from exc
        if metadata.get("format") != FORMAT:
            raise SpeakerFileError(f"{src} is not a dia_fast speaker file (format {metadata.get('format')!r})")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise SpeakerFileError(
                f"{src}: speaker format version {metadata.get('format_version')!r} is not supported "
                f"(this dia_fast {__version__} reads version {FORMAT_VERSION})"
            )
        if codes is None or keys != {"codes"}:
            raise SpeakerFileError(f"{src}: expected exactly one tensor 'codes', found {sorted(keys)}")
        required = ("transcript", "codec", "sample_rate", "n_codebooks", "codebook_size", "hop_length")
        missing = [k for k in required if k not in metadata]
        if missing:
            raise SpeakerFileError(f"{src}: metadata lacks {missing}")
        codec = {k: metadata[k] for k in ("codec", *_CODEC_NUMBERS)}
        if not all(codec[k].isdecimal() and int(codec[k]) > 0 for k in _CODEC_NUMBERS):
            raise SpeakerFileError(f"{src}: bad codec metadata {codec} (whole numbers > 0 expected)")
        n_codebooks, codebook_size = int(codec["n_codebooks"]), int(codec["codebook_size"])
        if codes.dtype != torch.long or codes.ndim != 2 or codes.shape[1] != n_codebooks or codes.shape[0] == 0:
            raise SpeakerFileError(
                f"{src}: codes must be int64 [T, {n_codebooks}] with T > 0, got {codes.dtype} {tuple(codes.shape)}"
            )
        if int(codes.min()) < 0 or int(codes.max()) >= codebook_size:
            raise SpeakerFileError(f"{src}: codes outside 0..{codebook_size - 1}")
        if not metadata["transcript"].strip():
            raise SpeakerFileError(f"{src}: the transcript is empty")
        speaker = cls(codes, metadata["transcript"], codec, metadata.get("name", ""))
        if pool is not None:
            speaker.check_compatible(pool)
        return speaker

    def __repr__(self) -> str:
        seconds = ""
        rate = int(self.codec.get("sample_rate", 0)) / max(int(self.codec.get("hop_length", 1) or 1), 1)
        if rate:
            seconds = f", {self.frames / rate:.1f} s"
        return f"CustomSpeaker({self.name or 'unnamed'!r}, {self.frames} frames{seconds}, {self.transcript[:30]!r})"

"""Stored voices of the server: speakers (prompt codes + transcript) in a directory, one
``<id>.safetensors`` file each (:class:`dia_fast.voice.CustomSpeaker`'s format), and how a request's
``voice`` becomes the engine's text and prompt."""

from __future__ import annotations

import io
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..voice.speaker import CustomSpeaker, SpeakerFileError

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = ["BUILTIN_VOICES", "VoiceError", "VoiceStore", "builtin_voice_json", "resolve_voice"]

log = logging.getLogger("dia_fast.serve")

BUILTIN_VOICES = {"s1": "[S1]", "s2": "[S2]", "dialogue": None}
_CACHED_VOICES = 256  # stored voices kept decoded in memory at most (a 20 s voice: ~120 KB of codes)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_TAG_START_RE = re.compile(r"^\s*\[S[12]\]")


class VoiceError(ValueError):
    """A voice request that cannot be served; ``status`` is the HTTP status it answers with, ``param`` the request
    field at fault when it is known."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_voice", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


@dataclass
class VoiceInfo:
    id: str
    name: str
    transcript: str
    frames: int
    seconds: float
    created: int

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "voice",
            "type": "stored",
            "name": self.name,
            "transcript": self.transcript,
            "duration_s": round(self.seconds, 3),
            "created_at": self.created,
        }


def check_voice_id(voice_id: str) -> str:
    """A stored voice's id: 1-64 letters, digits, ``_`` or ``-`` (no dots or slashes: never a path), not the
    name of a built-in voice."""
    if not isinstance(voice_id, str) or not _ID_RE.fullmatch(voice_id):
        raise VoiceError(
            "a voice id is 1-64 letters, digits, '_' or '-', starting with a letter or digit", param="name"
        )
    if voice_id.lower() in BUILTIN_VOICES:
        raise VoiceError(f"{voice_id!r} is a built-in voice", param="name")
    return voice_id


def builtin_voice_json(voice: str) -> dict[str, Any]:
    """A built-in voice as the API lists it (``S1``, ``S2``, ``dialogue``)."""
    return {"id": voice.upper() if voice != "dialogue" else voice, "object": "voice", "type": "builtin"}


@contextmanager
def _storage(action: str, voice_id: str) -> Iterator[None]:
    """A failure of the voices directory itself (permissions, a full disk, ...) while doing ``action``: a
    VoiceError 500 ``voice_storage_error`` that names the OS error but not the server's paths, logged in full."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and action != "store":
            raise
        log.error("voice store: cannot %s voice %r", action, voice_id, exc_info=True)
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__  # (strerror may hold the path)
        raise VoiceError(f"cannot {action} voice {voice_id!r}: {reason}", 500, "voice_storage_error") from None


class VoiceStore:
    """Voices in ``directory`` (created when missing). Thread-safe; files are written atomically. A failure of the
    directory itself is a :class:`VoiceError` 500 (``voice_storage_error``)."""

    def __init__(self, directory: Path | None, tts: DiaTTS) -> None:
        self.directory = directory
        self.tts = tts
        self._lock = threading.Lock()
        # id -> (file mtime, speaker), least recently used first; the files are the truth (another replica, or an
        # operator, may change or delete them), the cache only saves re-reading them
        self._cache: OrderedDict[str, tuple[float, CustomSpeaker]] = OrderedDict()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _path(self, voice_id: str) -> Path:
        if self.directory is None:
            raise VoiceError("this server stores no voices (start it with --voices-dir)", 404, "voice_not_found")
        return self.directory / f"{check_voice_id(voice_id)}.safetensors"

    def get(self, voice_id: str) -> CustomSpeaker:
        """The stored voice ``voice_id`` (checked against the model's codec); VoiceError 404 when missing."""
        path = self._path(voice_id)
        try:
            with _storage("read", voice_id):
                mtime = path.stat().st_mtime
        except FileNotFoundError:
            with self._lock:
                self._cache.pop(voice_id, None)  # (deleted by another replica or by hand)
            raise VoiceError(f"voice {voice_id!r} not found", 404, "voice_not_found") from None
        with self._lock:
            cached = self._cache.get(voice_id)
            if cached is not None and cached[0] == mtime:
                self._cache.move_to_end(voice_id)
                return cached[1]
        try:
            speaker = CustomSpeaker.load(path, self.tts)
        except (SpeakerFileError, FileNotFoundError) as exc:
            reason = str(exc).replace(str(path), path.name)  # (the server's directories are not the client's business)
            raise VoiceError(f"voice {voice_id!r} cannot be used: {reason}", 500, "voice_unreadable") from exc
        with self._lock:
            try:  # kept only while the file is still the one read (a delete or replace meanwhile wins)
                current = path.stat().st_mtime
            except OSError:
                current = None
            if current == mtime:
                self._cache[voice_id] = (mtime, speaker)
                self._cache.move_to_end(voice_id)
                while len(self._cache) > _CACHED_VOICES:
                    self._cache.popitem(last=False)
        return speaker

    def info(self, voice_id: str) -> VoiceInfo:
        """What :meth:`list` says of the stored voice ``voice_id``; VoiceError 404 when missing."""
        speaker = self.get(voice_id)
        try:
            with _storage("read", voice_id):
                return self._info(voice_id, speaker, self._path(voice_id))
        except FileNotFoundError:  # deleted since get() read it
            raise VoiceError(f"voice {voice_id!r} not found", 404, "voice_not_found") from None

    def list(self) -> list[VoiceInfo]:
        """The readable stored voices, by id (files that cannot be read are left out)."""
        if self.directory is None:
            return []
        out = []
        with _storage("list", "*"):
            paths = sorted(self.directory.glob("*.safetensors"))
        for path in paths:
            voice_id = path.stem
            if not _ID_RE.fullmatch(voice_id):
                continue
            try:
                out.append(self._info(voice_id, self.get(voice_id), path))
            except (VoiceError, OSError):
                continue  # an unreadable (or just deleted) file is left alone and not offered
        return out

    def _info(self, voice_id: str, speaker: CustomSpeaker, path: Path) -> VoiceInfo:
        fps = self.tts.codec.sample_rate / self.tts.codec.hop_length
        return VoiceInfo(
            voice_id, speaker.name, speaker.transcript, speaker.frames, speaker.frames / fps, int(path.stat().st_mtime)
        )

    def create(
        self, voice_id: str, audio: bytes, transcript: str, *, overwrite: bool, min_s: float, max_s: float
    ) -> VoiceInfo:
        """Encode ``audio`` (a WAV/FLAC/OGG/MP3 file's bytes) once and store it with its transcript."""
        from ..audio import AudioFormatError, read_audio
        from ..audio.io import AudioTooLongError
        from ..longform import chunk_budget

        path = self._path(voice_id)
        if not isinstance(transcript, str) or not transcript.strip():
            raise VoiceError("a voice needs the transcript of its audio (form field 'transcript')", param="transcript")
        try:  # the transcript goes in front of every text this voice speaks: it must leave room for one
            chunk_budget(self.tts, prompt_text=transcript)
        except ValueError as exc:
            raise VoiceError(f"the transcript is too long for this model: {exc}", param="transcript") from None
        with _storage("read", voice_id):
            exists = path.exists()
        if exists and not overwrite:
            raise VoiceError(f"voice {voice_id!r} exists; send overwrite=true to replace it", 409, "voice_exists")
        rate = self.tts.codec.sample_rate
        try:  # bounded: a few MB of compressed silence must not decode to GBs before its length is checked
            bound = max_s if math.isfinite(max_s) else None  # (an operator's max_voice_seconds=inf: no bound)
            samples, _ = read_audio(io.BytesIO(audio), target_rate=rate, mono=True, max_seconds=bound)
        except AudioTooLongError as exc:
            got = f"{exc.seconds:.2f} s" if exc.seconds is not None else f"more than {max_s:g} s"
            raise VoiceError(f"the voice audio must last {min_s:g}-{max_s:g} s, got {got}") from None
        except (AudioFormatError, ValueError, RuntimeError) as exc:
            raise VoiceError(f"the uploaded audio cannot be read: {exc}") from exc
        seconds = samples.shape[0] / rate
        if not min_s <= seconds <= max_s:
            raise VoiceError(f"the voice audio must last {min_s:g}-{max_s:g} s, got {seconds:.2f} s")
        try:
            speaker = CustomSpeaker.from_audio(samples, transcript, self.tts, rate, name=voice_id)
        except ValueError as exc:
            raise VoiceError(f"the uploaded audio cannot be used as a voice: {exc}") from exc
        with self._lock, _storage("store", voice_id):
            if path.exists() and not overwrite:
                raise VoiceError(f"voice {voice_id!r} exists; send overwrite=true to replace it", 409, "voice_exists")
            speaker.save(path)
            self._cache.pop(voice_id, None)
            return self._info(voice_id, speaker, path)

    def delete(self, voice_id: str) -> None:
        path = self._path(voice_id)
        with self._lock:
            try:
                with _storage("delete", voice_id):
                    path.unlink()
            except FileNotFoundError:
                raise VoiceError(f"voice {voice_id!r} not found", 404, "voice_not_found") from None
            self._cache.pop(voice_id, None)


def _tagged(text: str, tag: str) -> str:
    return text if _TAG_START_RE.match(text) else f"{tag} {text}"


def resolve_voice(voice: str, text: str, store: VoiceStore) -> dict[str, Any]:
    """The engine's ``text``, ``audio_prompt`` and ``audio_prompt_text`` for a request's ``voice``:

    * ``S1`` / ``S2``: the text as that speaker (its tag is put first unless the text starts with a tag);
    * ``dialogue``: the text as written, with its own ``[S1]``/``[S2]`` tags (``[S1]`` first when it has none);
    * a stored voice id: that voice's prompt and transcript, the text spoken as ``[S1]``."""
    key = voice.strip().lower() if isinstance(voice, str) else voice
    if key in ("s1", "s2"):
        return {"text": _tagged(text, BUILTIN_VOICES[key]), "audio_prompt": None, "audio_prompt_text": None}
    if key == "dialogue":
        return {"text": _tagged(text, "[S1]"), "audio_prompt": None, "audio_prompt_text": None}
    if not isinstance(voice, str) or not _ID_RE.fullmatch(voice):
        raise VoiceError(f"unknown voice {voice!r}: use S1, S2, dialogue or a stored voice id (GET /v1/audio/voices)")
    try:
        speaker = store.get(voice)
    except VoiceError as exc:
        if exc.status == 404:
            raise VoiceError(
                f"unknown voice {voice!r}: use S1, S2, dialogue or a stored voice id (GET /v1/audio/voices)"
            ) from None
        raise
    codes: torch.Tensor = speaker.codes
    return {"text": _tagged(text, "[S1]"), "audio_prompt": codes, "audio_prompt_text": speaker.tagged_transcript(0)}

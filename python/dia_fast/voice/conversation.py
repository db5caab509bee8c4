"""``Conversation``: a dialogue (text with [S1]/[S2] turns) spoken by chosen voices through a ``VoicePool``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..audio import check_crossfade_ms, crossfade_join, normalize_loudness, write_audio
from ..longform import DEFAULT_CHARS_PER_SECOND, DEFAULT_MAX_CHUNK_SECONDS, pieces
from ..serving import RequestHandle
from ..text import SPEAKER_TAG_RE as _TAG_RE
from ..text import warn_doubtful_text
from .pool import GenerationOptions, VoicePool
from .speaker import CustomSpeaker, Speaker

__all__ = ["Audio", "Conversation", "SpeakerLike", "Turn"]

SpeakerLike = Speaker | CustomSpeaker
Turn = tuple[Speaker | CustomSpeaker | str | int, str]


@dataclass(frozen=True)
class Audio:
    """Generated speech: float32 mono ``samples`` at ``sample_rate`` (and the codes of each chunk).
    ``truncated``: ``max_new_tokens`` ended a chunk's speech before the model did."""

    samples: np.ndarray
    sample_rate: int
    codes: tuple[torch.Tensor, ...] = field(default=(), repr=False)
    truncated: bool = False

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return len(self.samples) / self.sample_rate

    def normalized(self, target_lufs: float = -23.0, *, peak_ceiling_db: float = -1.0) -> Audio:
        """A copy at ``target_lufs`` integrated loudness (ITU-R BS.1770), peaks kept below the ceiling.

        Silent audio and audio shorter than 400 ms keep their loudness; only a peak above the ceiling is lowered
        (see :func:`dia_fast.audio.normalize_loudness`).
        """
        samples = normalize_loudness(self.samples, self.sample_rate, target_lufs, peak_ceiling_db=peak_ceiling_db)
        return Audio(samples, self.sample_rate, self.codes, self.truncated)

    def save(self, path: str | Path, *, format: str | None = None, subtype: str = "PCM_16") -> Path:
        """Write the audio atomically in the format ``format`` or the extension names (.wav, .flac, .ogg, .opus,
        .mp3; :func:`dia_fast.audio.write_audio`): 16-bit, or 32-bit float (``subtype="FLOAT"``, WAV only)."""
        return write_audio(path, self.samples, self.sample_rate, format=format, subtype=subtype)


def _slots(speaker_or_speakers: SpeakerLike | Sequence[SpeakerLike] | None) -> list[SpeakerLike]:
    """The voice of each tag: slot 0 speaks [S1], slot 1 speaks [S2]."""
    if speaker_or_speakers is None:
        return [Speaker.S1, Speaker.S2]
    if isinstance(speaker_or_speakers, Speaker):
        return [Speaker.S1, Speaker.S2]  # a built-in voice: the text's tags decide
    if isinstance(speaker_or_speakers, CustomSpeaker):
        return [speaker_or_speakers, Speaker.S2]
    slots = list(speaker_or_speakers)
    if not 1 <= len(slots) <= 2:
        raise ValueError(f"Dia has two voices ([S1], [S2]): give one or two speakers, got {len(slots)}")
    for i, s in enumerate(slots):
        if isinstance(s, Speaker):
            if s.index != i:
                raise ValueError(f"{s.tag} cannot fill slot {i}: slot {i} speaks {Speaker.parse(i).tag}")
        elif not isinstance(s, CustomSpeaker):
            raise TypeError(f"speakers must be Speaker or CustomSpeaker, got {type(s).__name__}")
    return slots + [Speaker.S2] * (2 - len(slots))


def _default_tag(speaker_or_speakers: object) -> str:
    return speaker_or_speakers.tag if isinstance(speaker_or_speakers, Speaker) else Speaker.S1.tag


class Conversation:
    """Text (or turns) spoken by one or two voices through ``pool``.

    ``text_or_turns``: a string, optionally with ``[S1]`` / ``[S2]`` turns (a string without
    tags is spoken by the first speaker), or a list of ``(speaker, text)`` turns where speaker is
    a slot index (0 = [S1], 1 = [S2]), a tag (``"[S1]"``, ``Speaker.S2``) or one of the given
    :class:`CustomSpeaker` objects.

    ``speaker_or_speakers``: one voice or a list of up to two, by slot: ``[alice, bob]`` makes
    ``alice`` speak the [S1] turns and ``bob`` the [S2] turns. A :class:`Speaker` is a built-in
    voice (no prompt; ``Speaker.S2`` alone speaks untagged text as [S2]); a
    :class:`CustomSpeaker` clones a voice (its codes and transcript are the prompt; two custom
    speakers' prompts are concatenated).

    ``options``: generation settings (:class:`~dia_fast.voice.pool.GenerationOptions`:
    ``max_new_tokens``, ``cfg_scale``, ``temperature``, ``top_p``, ``cfg_filter_top_k``,
    ``do_sample``, ``seed``); ``crossfade_ms``, ``chars_per_second``, ``max_chunk_seconds``:
    long-form settings (see :mod:`dia_fast.longform`). Text too long for one generation
    (:func:`dia_fast.longform.pieces`) is split into chunks, which the pool generates side by side, joined with
    crossfades; ``max_new_tokens`` limits each generation and is no reason to split.
    """

    def __init__(
        self,
        text_or_turns: str | Sequence[Turn],
        speaker_or_speakers: SpeakerLike | Sequence[SpeakerLike] | None,
        pool: VoicePool,
        *,
        crossfade_ms: float = 40.0,
        chars_per_second: float = DEFAULT_CHARS_PER_SECOND,
        max_chunk_seconds: float | None = DEFAULT_MAX_CHUNK_SECONDS,
        **options: Any,
    ) -> None:
        if not isinstance(pool, VoicePool):
            raise TypeError(f"pool must be a VoicePool, got {type(pool).__name__}")
        self.pool = pool
        self.options = GenerationOptions(**options)
        self.crossfade_ms = check_crossfade_ms(crossfade_ms)
        if isinstance(speaker_or_speakers, str):  # "[S2]", "S2": a built-in voice by name
            speaker_or_speakers = Speaker.parse(speaker_or_speakers)
        self.speakers = _slots(speaker_or_speakers)
        custom = [(i, s) for i, s in enumerate(self.speakers) if isinstance(s, CustomSpeaker)]
        for _, s in custom:
            s.check_compatible(pool)
        self.text = self._build_text(text_or_turns, _default_tag(speaker_or_speakers))
        warn_doubtful_text(self.text, stacklevel=3)  # (as DiaTTS.generate: an unknown tag, a control character)
        self.prompt: torch.Tensor | None = None
        self.prompt_text: str | None = None
        if custom:
            # the speakers' prompts one after the other, checked (length included) as the model checks a prompt
            self.prompt = pool.tts.encode_prompt(torch.cat([s.codes for _, s in custom], dim=0))
            self.prompt_text = " ".join(s.tagged_transcript(i) for i, s in custom)
        # split only a text that does not fit one generation (max_new_tokens limits each generation, as in
        # DiaTTS.generate; it is no reason to split)
        self.chunks = pieces(
            pool.tts,
            self.text,
            prompt_text=self.prompt_text,
            prompt_frames=0 if self.prompt is None else int(self.prompt.shape[0]),
            chars_per_second=chars_per_second,
            max_chunk_seconds=max_chunk_seconds,
        )
        # the length limits against the model and the prompt, now rather than at generation
        pool.engine.check_lengths(
            0 if self.prompt is None else int(self.prompt.shape[0]),
            self.options.max_new_tokens,
            self.options.min_new_tokens,
        )

    def _build_text(self, text_or_turns: str | Sequence[Turn], default_tag: str) -> str:
        if isinstance(text_or_turns, str):
            if not text_or_turns.strip():
                raise ValueError("the conversation text is empty")
            text = text_or_turns.strip()
            return text if text.startswith(("[S1]", "[S2]")) else f"{default_tag} {text}"
        turns = list(text_or_turns)
        if not turns:
            raise ValueError("the conversation has no turns")
        parts = []
        for k, turn in enumerate(turns):
            if not (isinstance(turn, (tuple, list)) and len(turn) == 2):
                raise TypeError(f"turn {k} must be a (speaker, text) pair, got {turn!r}")
            who, words = turn
            if not isinstance(words, str) or not words.strip():
                raise ValueError(f"turn {k} has no text")
            if _TAG_RE.search(words):
                raise ValueError(f"turn {k} contains a speaker tag: give each turn's speaker in the pair instead")
            parts.append(f"{self._tag_of(who)} {words.strip()}")
        return " ".join(parts)

    def _tag_of(self, who: object) -> str:
        if isinstance(who, CustomSpeaker):
            for i, s in enumerate(self.speakers):
                if s is who:
                    return Speaker.parse(i).tag
            raise ValueError(f"{who!r} speaks a turn but is not one of the conversation's speakers")
        return Speaker.parse(who).tag

    def _submit(self, **stream: Any) -> RequestHandle:
        """The conversation as one request of the pool's engine: its text chunks are the request's pieces (chunk
        ``k`` seeded ``seed + k``), decoded side by side, counted once in the queue and joined with the
        conversation's crossfade."""
        return self.pool.submit(
            self.chunks,
            audio_prompt=self.prompt,
            audio_prompt_text=self.prompt_text,
            crossfade_ms=self.crossfade_ms,
            **stream,
            **self.options.kwargs(),
        )

    async def generate(self) -> Audio:
        """Speak the conversation; its text chunks, and concurrent calls, decode side by side in the pool.
        Cancelling the awaiting task cancels what still runs."""
        results = await self._submit().results_async()
        rate = self.pool.sample_rate
        samples = crossfade_join([r.audio for r in results], rate, self.crossfade_ms)
        return Audio(samples, rate, tuple(r.codes for r in results), any(r.truncated for r in results))

    def stream(self, *, chunk_frames: int = 43, first_chunk_frames: int | None = None) -> Iterator[np.ndarray]:
        """Speak the conversation as a stream of float32 PCM chunks (at ``pool.sample_rate``).

        Every text chunk is submitted to the pool's engine at once (they decode side by side, batched with
        whatever else runs) and streamed in order (``chunk_frames`` codec frames per audio chunk, after a first
        of ``first_chunk_frames``); the last ``crossfade_ms`` of each text chunk is held back and crossfaded
        with the start of the next, as :meth:`generate` joins them. The joined stream equals
        :meth:`generate`'s samples for the same seed (when every text chunk is longer than twice the
        crossfade). Closing the stream cancels what is still running: breaking out of ``for chunk in
        conv.stream()`` drops (and so closes) it; a stream kept in a variable needs ``close()`` (or
        ``contextlib.closing``).
        """
        handle = self._submit(stream=True, chunk_frames=chunk_frames, first_chunk_frames=first_chunk_frames)
        try:
            yield from handle
        finally:
            handle.cancel()

    def generate_sync(self) -> Audio:
        """Blocking :meth:`generate` (not from inside a running event loop: ``await generate()`` there)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.generate())
        raise RuntimeError("generate_sync() was called inside a running event loop: use `await generate()`")

    def __repr__(self) -> str:
        return f"Conversation({len(self.chunks)} chunk(s), {len(self.text)} chars, speakers={self.speakers})"

"""Long-form text: split at sentence / speaker-turn boundaries, generate chunk by chunk, crossfade.

Dia reads at most ``text_length`` bytes and writes at most ``audio_length`` codec frames (~35 s)
per generation, and speaks best with 5-20 s of audio per generation. :func:`split_text` cuts a
long text into chunks that fit both budgets; :func:`generate_long` speaks them with one voice and
joins the audio.

The audio budget is a heuristic (the model decides how fast it talks): a chunk may hold at most
``chars_per_second * seconds`` spoken characters, where ``seconds`` is the audio the model can
still write after the prompt (capped at ``max_chunk_seconds``, 20 s by default) and
``chars_per_second`` defaults to 12, a slow speaking rate (English speech runs ~12-16 characters
per second including spaces), so that a chunk's speech fits even when the model speaks slowly.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .audio import check_crossfade_ms, crossfade_join
from .options import check_int_option
from .progress import progress_bar
from .text import SPEAKER_TAG_RE as _TAG_RE
from .text import check_prompted_text, text_already_checked, text_tokens, warn_doubtful_text

if TYPE_CHECKING:
    from .api import DiaTTS

__all__ = [
    "DEFAULT_CHARS_PER_SECOND",
    "DEFAULT_MAX_CHUNK_SECONDS",
    "PromptTooLong",
    "TextChunk",
    "chunk_budget",
    "generate_long",
    "pieces",
    "spoken_chars",
    "split_after_prompt",
    "split_text",
    "split_text_spans",
    "text_tokens",
]

DEFAULT_CHARS_PER_SECOND = 12.0
DEFAULT_MAX_CHUNK_SECONDS = 20.0

# A sentence ends at . ! ? …, optionally followed by closing quotes/brackets, then whitespace; at their full-width
# CJK forms 。！？ (no whitespace needed: those scripts put none between sentences); or at a line break. The
# whitespace stays with the sentence before it.
_SENTENCE_END_RE = re.compile(r"[.!?…]+[\"'”’)\]]*\s+|[。！？]+[」』\"'”’）)\]]*\s*|[^\S\n]*\n\s*")
# a word: a short parenthesised group such as "(clears throat)" (a non-verbal tag, never cut; a longer aside is
# words like the rest) or a run without whitespace
_WORD_RE = re.compile(r"\([^()\s][^()\n]{0,40}\)[^\s(]*\s*|\S+\s*|\s+")
_PLAIN_WORD_RE = re.compile(r"\S+\s*|\s+")  # (a group that does not fit a chunk is split into these)


def spoken_chars(text: str) -> int:
    """Characters the audio budget counts: tags dropped, whitespace runs collapsed to one space."""
    return len(" ".join(_TAG_RE.sub(" ", text).split()))


@dataclass(frozen=True)
class TextChunk:
    """One chunk of :func:`split_text_spans`: ``text == prefix + source[start:end]``.

    ``prefix`` is the speaker tag (``"[S1] "``) carried into a chunk that starts mid-turn, or "".
    """

    text: str
    start: int
    end: int
    prefix: str


def _units(text: str) -> Iterator[tuple[int, int, str | None, bool]]:
    """Sentences as (start, end, speaker tag active at start, starts with its tag), covering ``text``."""
    tags = list(_TAG_RE.finditer(text))
    bounds = [0] + [m.start() for m in tags] + [len(text)]
    speakers: list[str | None] = [None] + [m.group() for m in tags]
    for seg, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if lo == hi:
            continue
        speaker = speakers[seg]
        pos = lo
        for m in _SENTENCE_END_RE.finditer(text, lo, hi):
            if m.end() < hi and text[m.end() : hi].strip():
                yield pos, m.end(), speaker, pos == lo and seg > 0
                pos = m.end()
        yield pos, hi, speaker, pos == lo and seg > 0


def split_text_spans(
    text: str,
    max_bytes: int,
    max_chars: int | None = None,
) -> list[TextChunk]:
    """:func:`split_text` with where each chunk comes from (see :class:`TextChunk`)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: give at least one character to speak")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")

    def fits(prefix: str, start: int, end: int) -> bool:
        piece = prefix + text[start:end]
        return text_tokens(piece) <= max_bytes and (max_chars is None or spoken_chars(piece) <= max_chars)

    def prefix_for(speaker: str | None, starts_turn: bool) -> str:
        return f"{speaker} " if speaker is not None and not starts_turn else ""

    # pieces: whole sentences where they fit in a chunk of their own, else their words
    pieces: list[tuple[int, int, str]] = []  # (start, end, prefix if a chunk starts here)
    for start, end, speaker, starts_turn in _units(text):
        if fits(prefix_for(speaker, starts_turn), start, end):
            pieces.append((start, end, prefix_for(speaker, starts_turn)))
            continue
        words = []
        for m in _WORD_RE.finditer(text, start, end):
            if text[m.start()] == "(" and not fits(prefix_for(speaker, False), m.start(), m.end()):
                words += [(w.start(), w.end()) for w in _PLAIN_WORD_RE.finditer(text, m.start(), m.end())]
            else:
                words.append((m.start(), m.end()))
        if starts_turn and len(words) > 1 and _TAG_RE.fullmatch(text[words[0][0] : words[0][1]].strip()):
            words[:2] = [(words[0][0], words[1][1])]  # the turn's tag stays with its first word
        for k, (lo, hi) in enumerate(words):
            prefix = prefix_for(speaker, starts_turn and k == 0)
            if not fits(prefix, lo, hi):
                word = text[lo:hi].strip()
                raise ValueError(
                    f"the word {word[:40]!r}{'...' if len(word) > 40 else ''} at character {lo} does not "
                    f"fit in one chunk (at most {max_bytes} text bytes"
                    f"{'' if max_chars is None else f' and {max_chars} spoken characters'}); break it up"
                )
            pieces.append((lo, hi, prefix))

    chunks: list[TextChunk] = []
    cur_start, cur_end, cur_prefix = pieces[0]
    for start, end, prefix in pieces[1:]:
        if fits(cur_prefix, cur_start, end):
            cur_end = end
        else:
            chunks.append(TextChunk(cur_prefix + text[cur_start:cur_end], cur_start, cur_end, cur_prefix))
            cur_start, cur_end, cur_prefix = start, end, prefix
    chunks.append(TextChunk(cur_prefix + text[cur_start:cur_end], cur_start, cur_end, cur_prefix))
    return chunks


def split_text(text: str, max_bytes: int, max_chars: int | None = None) -> list[str]:
    """Split ``text`` into chunks that each fit Dia's text and audio budgets.

    Chunks end at sentence boundaries (``. ! ? …`` followed by whitespace, ``。！？`` with or without it, or a line
    break) or speaker turns
    (``[S1]`` / ``[S2]``) and are packed greedily: each holds as many whole sentences as fit in
    ``max_bytes`` text tokens (:func:`text_tokens`) and ``max_chars`` spoken characters
    (:func:`spoken_chars`; None = no audio budget). A chunk that starts in the middle of a turn
    begins with that turn's speaker tag (``"[S2] "``). A sentence longer than the budget is split
    between words; a single word longer than the budget raises ``ValueError``.

    Every character of ``text`` is in exactly one chunk, in order: removing the carried tags and
    joining the chunks gives ``text`` back (whitespace included; strip a chunk before speaking it
    if you like). Raises ``ValueError`` for empty text.
    """
    return [c.text for c in split_text_spans(text, max_bytes, max_chars)]


def _check_rates(chars_per_second: object, max_chunk_seconds: object) -> None:
    """``chars_per_second`` a finite number > 0, ``max_chunk_seconds`` one too or None: else a TypeError /
    ValueError naming it."""
    for name, value in (("chars_per_second", chars_per_second), ("max_chunk_seconds", max_chunk_seconds)):
        if value is None and name == "max_chunk_seconds":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")


def chunk_budget(
    tts: DiaTTS,
    *,
    prompt_text: str | None = None,
    prompt_frames: int = 0,
    max_new_tokens: int | None = None,
    chars_per_second: float = DEFAULT_CHARS_PER_SECOND,
    max_chunk_seconds: float | None = DEFAULT_MAX_CHUNK_SECONDS,
) -> tuple[int, int]:
    """``(max_bytes, max_chars)`` for one chunk spoken by ``tts`` after a prompt.

    ``max_bytes``: ``text_length`` minus the prompt transcript's tokens and the space that joins
    it to the text. ``max_chars``: ``chars_per_second`` times the seconds of audio left, i.e. the
    decoder steps (``max_new_tokens``, at most ``audio_length`` less the BOS and prompt frames) less
    the delay pattern's tail of ``max_delay + 1`` steps, capped at ``max_chunk_seconds``.
    Raises ``ValueError`` when nothing is left.
    """
    _check_rates(chars_per_second, max_chunk_seconds)
    data = tts.config.data
    max_bytes = data.text_length
    if prompt_text and prompt_text.strip():
        max_bytes -= text_tokens(prompt_text.strip()) + 1
    if max_bytes < 1:
        raise ValueError(
            f"no room left for text: the prompt's transcript takes {data.text_length - max_bytes} of the model's "
            f"{data.text_length} text bytes; use a shorter transcript"
        )
    # decoder positions after the BOS + prompt prefix; the delay pattern's last max_delay + 1 add no frame
    steps = data.audio_length - prompt_frames - 1
    limited = max_new_tokens is not None and int(max_new_tokens) < steps
    if limited:
        steps = int(max_new_tokens)
    frames = steps - (data.max_delay + 1)
    if frames < 1:
        why = (
            f"max_new_tokens={max_new_tokens} leaves none after the delay pattern's {data.max_delay + 1} steps"
            if limited
            else f"the prompt takes {prompt_frames} of the model's {data.audio_length - 1} frames; use a shorter prompt"
        )
        raise ValueError(f"no room left for audio: {why}")
    seconds = frames / tts.codec.frame_rate
    if max_chunk_seconds is not None:
        seconds = min(seconds, max_chunk_seconds)
    max_chars = math.floor(chars_per_second * seconds)
    if max_chars < 1:
        raise ValueError(
            f"no room for one character: {seconds:.3g} s of audio per chunk at chars_per_second={chars_per_second}"
        )
    return max_bytes, max_chars


class PromptTooLong(ValueError):
    """A voice prompt that leaves too little of the model's audio budget to speak the text."""


def split_after_prompt(tts: DiaTTS, prompt_frames: int, split: Callable[[int], list[str]]) -> list[str]:
    """``split(prompt_frames)``: a text split with the budgets left after a voice prompt of that many frames. A text
    that splits without the prompt but not after it fails because of the prompt, which leaves too little audio: the
    error (:class:`PromptTooLong`) says so, and how long a prompt this text allows."""

    def splits(frames: int) -> bool:
        try:
            split(frames)
        except ValueError:
            return False
        return True

    try:
        return split(prompt_frames)
    except ValueError:
        if prompt_frames == 0 or not splits(0):
            raise  # the text's own problem (a word too long), prompt or not
    lo, hi = 0, prompt_frames  # the text splits after a prompt of lo frames, not of hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if splits(mid) else (lo, mid)
    rate = tts.codec.frame_rate
    raise PromptTooLong(
        f"the audio prompt is too long for this text: its {prompt_frames / rate:.1f} s leave too little of the "
        f"model's audio budget to speak it; use a prompt of at most {math.floor(lo / rate * 10) / 10:.1f} s "
        "(5-10 s is best)"
    )


def pieces(
    tts: DiaTTS,
    text: str,
    *,
    prompt_text: str | None = None,
    prompt_frames: int = 0,
    chars_per_second: float = DEFAULT_CHARS_PER_SECOND,
    max_chunk_seconds: float | None = DEFAULT_MAX_CHUNK_SECONDS,
) -> list[str]:
    """``text`` as the generations it takes: itself (unchanged) when it fits one, else :func:`split_text`'s chunks
    (stripped).

    It fits when its tokens (after the prompt's transcript) are within ``text_length`` and its spoken characters
    within ``chars_per_second`` times the model's whole audio budget after the prompt (~35 s without one). A
    ``max_new_tokens`` is a limit per generation, not a reason to split. A text that does not fit is split with
    :func:`chunk_budget`'s budgets (at most ``max_chunk_seconds`` of speech per chunk).
    """
    if not text.strip():
        raise ValueError("text is empty: give at least one character to speak")
    _check_rates(chars_per_second, max_chunk_seconds)  # also when the text needs no split

    def split(frames: int) -> list[str]:
        kw = dict(prompt_text=prompt_text, prompt_frames=frames, chars_per_second=chars_per_second)
        max_bytes, whole_budget_chars = chunk_budget(tts, max_chunk_seconds=None, **kw)
        encoded = text.strip() if prompt_text and prompt_text.strip() else text  # (prompted_text strips it)
        if text_tokens(encoded) <= max_bytes and spoken_chars(text) <= whole_budget_chars:
            return [text]  # as given, as DiaTTS.generate speaks it (outer whitespace included)
        max_bytes, max_chars = chunk_budget(tts, max_chunk_seconds=max_chunk_seconds, **kw)
        return [c.strip() for c in split_text(text, max_bytes, max_chars) if c.strip()]

    return split_after_prompt(tts, prompt_frames, split)


def generate_long(
    tts: DiaTTS,
    text: str,
    *,
    audio_prompt: Any = None,
    audio_prompt_text: str | None = None,
    crossfade_ms: float = 40.0,
    batch_size: int = 1,
    chars_per_second: float = DEFAULT_CHARS_PER_SECOND,
    max_chunk_seconds: float | None = DEFAULT_MAX_CHUNK_SECONDS,
    progress: bool | None = None,
    on_chunk: Callable[[int, np.ndarray], None] | None = None,
    chunks: Sequence[str] | None = None,
    chunk_kwargs: Callable[[str], dict[str, Any]] | None = None,
    **generate_kwargs: Any,
) -> tuple[np.ndarray, int]:
    """Speak a text of any length: split it (:func:`split_text`), generate each chunk, crossfade.

    Every chunk is spoken with the same voice: the same ``audio_prompt`` (a path, samples at the
    codec rate or codes ``[T, C]``; encoded once) and ``audio_prompt_text``, or no prompt.
    ``batch_size`` chunks (an int >= 1) are generated per ``tts.generate`` call (faster on a GPU; the same
    result with greedy decoding). Neighbouring chunks are joined with ``crossfade_ms`` (a number >= 0)
    equal-power crossfades. ``progress``: a per-chunk progress bar (default: when stderr is a
    terminal; never for a single chunk). ``on_chunk(i, audio)`` is called as each chunk is done.
    ``chunks``: an already split text, a sequence of str (e.g. :func:`split_text` with budgets of your own);
    ``text`` is then ignored. ``chunk_kwargs(chunk)``: keyword arguments for that chunk's generation alone, over
    the others (e.g. a length of its own: ``max_new_tokens``, ``min_new_tokens``, or a ``seed`` of its own in place of
    ``seed + k``); it needs ``batch_size=1``, and the prompt and progress are the whole text's (a TypeError).
    Other keyword arguments (``max_new_tokens``, ``cfg_scale``, ``temperature``, ``seed``,
    ``do_sample``, ...) go to :meth:`DiaTTS.generate` for every chunk.

    ``seed``: the ``tts.generate`` call that starts at chunk ``k`` is seeded ``seed + k`` (as
    :class:`~dia_fast.voice.Conversation` and the batching engine number their pieces), so chunks of the same
    text do not repeat the same audio; as ``tts.generate`` seeds text ``i`` of a batch ``seed + i``, chunk ``k`` is
    exactly ``tts.generate(chunk_k, seed=seed + k)`` whatever ``batch_size``.

    Returns ``(samples, sample_rate)``: float32 mono PCM at the codec's rate. Bad options (``batch_size``,
    ``crossfade_ms``, ``chunks``, ``seed``) raise ``TypeError`` / ``ValueError`` before any work.
    """
    batch_size = check_int_option("batch_size", batch_size, minimum=1)
    if chunk_kwargs is not None and batch_size != 1:
        raise ValueError(f"chunk_kwargs needs batch_size=1 (one generation per chunk), got batch_size={batch_size}")
    crossfade_ms = check_crossfade_ms(crossfade_ms)
    seed = check_int_option("seed", generate_kwargs.pop("seed", None), optional=True)
    if chunks is not None and (
        isinstance(chunks, str) or not isinstance(chunks, Sequence) or not all(isinstance(c, str) for c in chunks)
    ):
        got = "a str (give one text as text=)" if isinstance(chunks, str) else type(chunks).__name__
        raise TypeError(f"chunks must be a sequence of str (one text per chunk), got {got}")
    if "decode_audio" in generate_kwargs:  # (text and progress are parameters of their own)
        raise TypeError("generate_long() got an unexpected keyword argument 'decode_audio'")
    if audio_prompt is None and audio_prompt_text:
        raise ValueError("audio_prompt_text was given without an audio_prompt")
    if chunks is not None:  # each given chunk must fit, the transcript in front: checked before any work
        limit, transcript = tts.config.data.text_length, audio_prompt_text if audio_prompt is not None else None
        for chunk in filter(str.strip, chunks):
            check_prompted_text(chunk, transcript, limit)
    prompt_codes = None if audio_prompt is None else tts.encode_prompt(audio_prompt)
    if chunks is None:

        def split(frames: int) -> list[str]:
            max_bytes, max_chars = chunk_budget(
                tts,
                prompt_text=audio_prompt_text if prompt_codes is not None else None,
                prompt_frames=frames,
                max_new_tokens=generate_kwargs.get("max_new_tokens"),
                chars_per_second=chars_per_second,
                max_chunk_seconds=max_chunk_seconds,
            )
            return split_text(text, max_bytes, max_chars)

        chunks = split_after_prompt(tts, 0 if prompt_codes is None else int(prompt_codes.shape[0]), split)
    chunks = [c.strip() for c in chunks if c.strip()]
    if not chunks:
        raise ValueError("text is empty: give at least one character to speak")
    bar = progress_bar(len(chunks), progress if len(chunks) > 1 else False, desc="long-form", unit="chunk")
    pieces: list[np.ndarray] = []
    cut: list[int] = []  # chunks that max_new_tokens ended
    checked = contextlib.nullcontext()
    if isinstance(text, str) and text.strip():  # doubts about the text as written, not about its chunks
        warn_doubtful_text(text, stacklevel=3)
        checked = text_already_checked()
    try:
        with checked:
            for lo in range(0, len(chunks), batch_size):
                batch: Sequence[str] = chunks[lo : lo + batch_size]
                own = {} if chunk_kwargs is None else dict(chunk_kwargs(batch[0]))
                if fixed := sorted(own.keys() & {"audio_prompt", "audio_prompt_text", "progress", "text"}):
                    raise TypeError(f"chunk_kwargs cannot set {', '.join(fixed)}: they are the whole text's")
                chunk_seed = own.pop("seed") if "seed" in own else (None if seed is None else seed + lo)
                kwargs = {**generate_kwargs, **own}
                result = tts.generate(
                    list(batch),
                    audio_prompt=None if prompt_codes is None else [prompt_codes] * len(batch),
                    audio_prompt_text=audio_prompt_text if prompt_codes is not None else None,
                    progress=False,
                    seed=chunk_seed,
                    **kwargs,
                )
                if kwargs.get("max_new_tokens") is not None:  # (without a limit, generate has warned)
                    cut += [lo + k for k, t in enumerate(result.truncated) if t]
                for k, audio in enumerate(result.audio):
                    pieces.append(audio)
                    if on_chunk is not None:
                        on_chunk(lo + k, audio)
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    limit = "max_new_tokens" if chunk_kwargs is not None else f"max_new_tokens={generate_kwargs.get('max_new_tokens')}"
    if cut and not tts.demo:
        warnings.warn(
            f"{limit} ended the speech of chunk(s) {cut} of {len(chunks)} before the model did: "
            "their audio may stop mid-word (raise max_new_tokens, or leave it out)",
            UserWarning,
            stacklevel=2,
        )
    return crossfade_join(pieces, tts.sample_rate, crossfade_ms), tts.sample_rate

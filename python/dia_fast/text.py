"""Dia's byte-level text tokenizer: UTF-8 bytes, ``[S1]`` -> 1, ``[S2]`` -> 2, pad 0."""

from __future__ import annotations

import contextvars
import re
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from .options import check_int_option

SPEAKER_TOKENS = {b"[S1]": 1, b"[S2]": 2}
SPEAKER_TAG_RE = re.compile(r"\[S[12]\]")  # the tags of SPEAKER_TOKENS in a str
PAD_ID = 0


def _tokens(text: str) -> bytes:
    raw = text.encode("utf-8")
    for tag, tok in SPEAKER_TOKENS.items():
        raw = raw.replace(tag, bytes([tok]))
    return raw


def text_tokens(text: str) -> int:
    """Dia text tokens in ``text``: UTF-8 bytes, each ``[S1]`` / ``[S2]`` tag counting as one."""
    return len(_tokens(text))


def encode_text(text: str, max_length: int = 1024) -> list[int]:
    """Token ids of one text. Raises ValueError for empty text or text over ``max_length`` bytes."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: give at least one character to speak")
    ids = list(_tokens(text))
    if len(ids) > max_length:
        raise ValueError(
            f"text is {len(ids)} bytes after tokenization but the model accepts at most {max_length}; "
            "split it into shorter pieces (long-form generation splits at sentence boundaries)"
        )
    return ids


def encode_batch(
    texts: Sequence[str], max_length: int = 1024, pad_to_multiple: int = 1, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] (int64) and mask [B, T] (bool, True = real token) for a batch.

    T is the longest text rounded up to ``pad_to_multiple`` (capped at ``max_length``); padding
    is masked, so results do not depend on it.
    """
    if isinstance(texts, str):
        texts = [texts]
    if len(texts) == 0:
        raise ValueError("no texts given")
    pad_to_multiple = check_int_option("pad_to_multiple", pad_to_multiple, minimum=1)
    encoded = [encode_text(t, max_length) for t in texts]
    longest = max(len(e) for e in encoded)
    T = min(max_length, -(-longest // pad_to_multiple) * pad_to_multiple)
    ids = torch.full((len(encoded), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
        mask[i, : len(e)] = True
    return ids.to(device), mask.to(device)


def decode_ids(ids: Sequence[int]) -> str:
    """Inverse of :func:`encode_text` (pad ids dropped)."""
    out = bytearray()
    names = {v: k for k, v in SPEAKER_TOKENS.items()}
    for i in ids:
        if i == PAD_ID:
            continue
        out += names.get(int(i), bytes([int(i)]))
    return out.decode("utf-8", errors="replace")


def prompted_text(text: str, transcript: str | None) -> str:
    """The text the model reads with a voice prompt: the prompt's transcript, a space, the new text."""
    return text if not transcript or not transcript.strip() else f"{transcript.strip()} {text.strip()}"


def check_prompted_text(text: str, transcript: str | None, max_length: int) -> str:
    """:func:`prompted_text`, checked against the text budget as :func:`encode_text` checks a text (before any prompt
    is encoded); when the transcript is what makes it too long, the ValueError gives both lengths."""
    joined = prompted_text(text, transcript)
    tokens = text_tokens(joined)
    if transcript and transcript.strip() and tokens > max_length:
        raise ValueError(
            f"the audio prompt's transcript ({text_tokens(transcript.strip())} bytes) and the text "
            f"({text_tokens(text.strip())} bytes) are {tokens} bytes together, but the model reads at most "
            f"{max_length}: use a shorter text or a shorter prompt and transcript"
        )
    encode_text(joined, max_length)  # (empty, or too long by itself)
    return joined


_ANY_TAG_RE = re.compile(r"\[[Ss]\d+\]")
SHORT_TEXT_CHARS = 12  # spoken characters below which Dia's audio is known to be poor


def text_doubts(text: str) -> list[str]:
    """What looks wrong in a text Dia will speak (each a one-line warning; an empty list when nothing does):
    unknown speaker tags, control characters, only tags, no speaker tag first, very short text."""
    doubts = []
    unknown = sorted({t for t in _ANY_TAG_RE.findall(text) if t not in ("[S1]", "[S2]")})
    if unknown:
        doubts.append(f"unknown speaker tag(s) {', '.join(unknown)}: Dia knows [S1] and [S2] only (read as text)")
    control = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) == "Cc" and c not in "\n\t\r"})
    if control:
        doubts.append(
            f"the text contains control characters ({', '.join(control)}): Dia reads bytes, so U+0001 and U+0002 "
            "are the [S1] and [S2] speaker changes and U+0000 is padding; the others are spoken as bytes"
        )
    spoken = SPEAKER_TAG_RE.sub("", text).strip()
    if text.strip() and not spoken:
        doubts.append("the text is only speaker tags: there is nothing to speak")
    elif not SPEAKER_TAG_RE.match(text.lstrip()):
        doubts.append("the text does not start with [S1] or [S2]: Dia expects a speaker tag first")
    if spoken and len(spoken) < SHORT_TEXT_CHARS:
        doubts.append(
            f"very short text ({len(spoken)} characters): Dia is known to speak very short inputs poorly; "
            "a sentence or more works better"
        )
    return doubts


def warn_doubtful_text(text: str, stacklevel: int = 3) -> None:
    """:func:`text_doubts` as ``UserWarning`` s (Python shows each distinct one once); silent inside
    :func:`text_already_checked`."""
    if _CHECKED.get():
        return
    for doubt in text_doubts(text):
        warnings.warn(doubt, UserWarning, stacklevel=stacklevel)


_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("dia_fast_text_checked", default=False)


@contextmanager
def text_already_checked() -> Iterator[None]:
    """Within the block (this thread or task only), :func:`warn_doubtful_text` is silent: the caller has checked
    the whole text, whose chunks are spoken here (a chunk of a long text may well be short or start mid-turn)."""
    token = _CHECKED.set(True)
    try:
        yield
    finally:
        _CHECKED.reset(token)

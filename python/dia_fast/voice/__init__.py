"""Voices and serving: ``VoicePool`` (a shared model that batches requests), ``Speaker`` /
``CustomSpeaker`` (built-in and cloned voices) and ``Conversation`` (a dialogue to speak).

>>> from dia_fast import DiaTTS
>>> from dia_fast.voice import Conversation, CustomSpeaker, Speaker, VoicePool
>>> pool = VoicePool(DiaTTS.random("tiny"))
>>> audio = Conversation("[S1] Hi there. [S2] Hello!", [Speaker.S1, Speaker.S2], pool).generate_sync()
"""

from __future__ import annotations

from .conversation import Audio, Conversation
from .pool import GenerationOptions, PoolResult, VoicePool, default_max_batch
from .speaker import CustomSpeaker, Speaker, SpeakerFileError, codec_description

__all__ = [
    "Audio",
    "Conversation",
    "CustomSpeaker",
    "GenerationOptions",
    "PoolResult",
    "Speaker",
    "SpeakerFileError",
    "VoicePool",
    "codec_description",
    "default_max_batch",
]

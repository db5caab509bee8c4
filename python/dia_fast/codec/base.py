"""The interface every audio codec implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class AudioCodec(Protocol):
    """A neural audio codec that turns mono PCM into ``n_codebooks`` streams of discrete codes.

    ``encode`` takes float PCM at ``sample_rate`` shaped [N], [B, N] or [B, 1, N] and returns
    int64 codes [B, T, n_codebooks] (T = ceil(N / hop_length)); ``decode`` takes codes
    [B, T, n_codebooks] (or [T, n_codebooks]) and returns float32 PCM [B, T * hop_length].
    """

    sample_rate: int
    hop_length: int
    n_codebooks: int
    codebook_size: int

    @property
    def frame_rate(self) -> float:
        """Code frames per second (``sample_rate / hop_length``)."""
        ...

    def encode(self, wav: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...

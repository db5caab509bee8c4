"""The interface every audio codec implements, and the input checks the codecs share."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

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


class ConfigCodecProperties:
    """The :class:`AudioCodec` properties of a codec whose ``config`` holds ``sampling_rate``,
    ``hop_length``, ``n_codebooks`` and ``codebook_size`` (DAC and EnCodec)."""

    config: Any

    @property
    def sample_rate(self) -> int:
        """PCM sample rate in Hz."""
        return self.config.sampling_rate

    @property
    def hop_length(self) -> int:
        """PCM samples per code frame."""
        return self.config.hop_length

    @property
    def n_codebooks(self) -> int:
        """Codes per frame (residual codebooks)."""
        return self.config.n_codebooks

    @property
    def codebook_size(self) -> int:
        """Entries per codebook; codes are in ``[0, codebook_size)``."""
        return self.config.codebook_size

    @property
    def frame_rate(self) -> float:
        """Code frames per second (``sample_rate / hop_length``: 86.13 for DAC 44.1 kHz, 75 for EnCodec 24 kHz)."""
        return self.sample_rate / self.hop_length


def as_mono_batch(wav: torch.Tensor) -> torch.Tensor:
    """Float PCM [N], [B, N] or [B, 1, N] as [B, 1, N]; raises for other shapes, integer samples, empty
    input and NaN/inf samples (what :meth:`AudioCodec.encode` accepts)."""
    if not isinstance(wav, torch.Tensor):
        raise TypeError(f"wav must be a torch.Tensor, got {type(wav).__name__}")
    if not wav.is_floating_point():
        raise ValueError(f"wav must be floating point PCM, got {wav.dtype}")
    if wav.dim() == 1:
        wav = wav[None, None]
    elif wav.dim() == 2:
        wav = wav[:, None]
    elif wav.dim() != 3 or wav.shape[1] != 1:
        raise ValueError(f"wav must be [N], [B, N] or [B, 1, N] mono PCM, got shape {tuple(wav.shape)}")
    if wav.numel() == 0:
        raise ValueError(f"wav is empty (shape {tuple(wav.shape)})")
    if not bool(torch.isfinite(wav).all()):
        raise ValueError("wav contains NaN or infinite samples")
    return wav


def check_codes(codes: torch.Tensor, codec: AudioCodec, device: torch.device) -> torch.Tensor:
    """Integer codes [B, T, n_codebooks] or [T, n_codebooks] as int64 [B, T, n_codebooks] on ``device``;
    raises for another dtype, shape or codebook count and for codes outside ``[0, codebook_size)`` (what
    :meth:`AudioCodec.decode` accepts)."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 2:
        codes = codes[None]
    n, size = codec.n_codebooks, codec.codebook_size
    if codes.dim() != 3:
        raise ValueError(f"codes must be [B, T, n_codebooks] (or [T, n_codebooks]), got shape {tuple(codes.shape)}")
    if codes.shape[-1] != n:
        raise ValueError(
            f"codes must be [B, T, {n}] for this {type(codec).__name__}: got {codes.shape[-1]} codebooks "
            f"(shape {tuple(codes.shape)})"
        )
    if codes.numel():
        lo, hi = torch.stack([codes.min(), codes.max()]).tolist()  # one sync
        if lo < 0 or hi >= size:
            raise ValueError(f"codes must be in [0, {size - 1}] = [0, {size}), got values in [{lo}, {hi}]")
    return codes.to(device=device, dtype=torch.long)

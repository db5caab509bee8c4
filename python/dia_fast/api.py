"""``DiaTTS``: a loaded Dia model + audio codec, and ``generate`` from text to audio."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .codec.base import AudioCodec
from .config import DiaConfig
from .devices import resolve_device, resolve_dtype
from .generation.generate import DecodeOutput, generate_codes
from .generation.sampling import SamplingConfig
from .model import DiaModel, RMSNorm, RotaryEmbedding
from .text import encode_batch


@dataclass
class GenerationResult:
    """What :meth:`DiaTTS.generate` returns, one entry per input text.

    ``codes``: undelayed codec codes [T_i, C] (int64; BOS/EOS/PAD and the prompt removed);
    ``audio``: float32 mono PCM at ``sample_rate`` (empty when nothing was generated);
    ``delayed``: the raw delayed decoder sequences [B, L, C] (prefix included).
    """

    codes: list[torch.Tensor]
    audio: list[np.ndarray]
    sample_rate: int
    delayed: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def durations(self) -> list[float]:
        return [len(a) / self.sample_rate for a in self.audio]


def _finish_model(model: DiaModel, device: torch.device, dtype: torch.dtype) -> DiaModel:
    """Move/cast once at load: weights in ``dtype``, norm weights and RoPE frequencies in fp32."""
    model.to(device=device, dtype=dtype)
    for m in model.modules():
        if isinstance(m, RMSNorm):
            m.float()
        elif isinstance(m, RotaryEmbedding):
            m.reset()
    return model.eval().requires_grad_(False)


def init_random_weights(model: DiaModel, seed: int, std: float = 0.02) -> None:
    """Deterministic random weights (same for a seed on every device): N(0, std) matrices and
    embeddings, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                values = torch.randn(p.shape, generator=gen) * std
            p.copy_(values.to(p.dtype))


def _load_codec(codec: AudioCodec | str | Path | None, device: torch.device, where: Path | None) -> AudioCodec:
    from .codec import load_codec

    return load_codec(codec, device=device, search_dir=where)


class DiaTTS:
    """A Dia model ready to speak: model weights, codec and device.

    Build it with :meth:`from_pretrained` (a checkpoint directory or file, either layout) or
    :meth:`random` (random weights for tests and the demo).
    """

    def __init__(self, model: DiaModel, codec: AudioCodec, *, demo: bool = False) -> None:
        self.model = model
        self.codec = codec
        self.demo = demo
        if codec.n_codebooks != model.config.data.channels:
            raise ValueError(
                f"codec has {codec.n_codebooks} codebooks but the model has {model.config.data.channels} channels"
            )
        if codec.codebook_size > model.config.codebook_size:
            raise ValueError(
                f"codec codebook size {codec.codebook_size} exceeds the model's audio codes "
                f"({model.config.codebook_size})"
            )

    @property
    def config(self) -> DiaConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def sample_rate(self) -> int:
        return self.codec.sample_rate

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        codec: AudioCodec | str | Path | None = None,
        config: DiaConfig | None = None,
    ) -> DiaTTS:
        """Load a checkpoint: a directory (``config.json`` + weights) or a weights file, in the
        transformers or the official nari-labs layout, or a hub id when the hub is reachable.

        ``codec``: an :class:`AudioCodec`, a codec checkpoint path, ``"dac"``/``"encodec"``; by default
        a ``dac/`` directory inside the checkpoint directory, else a random demo codec (with a warning).
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        cfg, state, layout = ckpt.load_config_and_state(path, config)
        with torch.device("meta"):
            model = DiaModel(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        ckpt.check_state_dict(expected, state, f"checkpoint {path} ({layout} layout)")
        model.load_state_dict(state, strict=True, assign=True)
        model = _finish_model(model, dev, dt)
        root = Path(path) if Path(path).is_dir() else None
        return cls(model, _load_codec(codec, dev, root))

    @classmethod
    def random(
        cls,
        config_or_preset: DiaConfig | str = "tiny",
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        codec: AudioCodec | str | Path | None = None,
    ) -> DiaTTS:
        """Random weights (deterministic for ``seed``): presets ``"tiny"`` and ``"dia-1.6b"``.

        Without ``codec`` a small random DAC is used: the audio is a demonstration, not speech.
        """
        cfg = DiaConfig.preset(config_or_preset) if isinstance(config_or_preset, str) else config_or_preset
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        with torch.device("meta"):
            model = DiaModel(cfg)
        model.to_empty(device="cpu")
        init_random_weights(model, seed)
        model = _finish_model(model, dev, dt)
        if codec is None:  # the demo says it is a demo itself; no warning here
            from .codec import load_codec

            codec = load_codec(None, device=dev, warn_demo=False)
        return cls(model, _load_codec(codec, dev, None), demo=True)

    def save_pretrained(self, directory: str | Path, *, layout: str = "transformers") -> Path:
        """Write ``config.json`` + ``model.safetensors`` in the ``"transformers"`` or ``"official"`` layout."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        if layout == "transformers":
            state = ckpt.to_transformers(state)
        elif layout == "official":
            state = ckpt.to_official(state, self.config)
        else:
            raise ValueError(f"layout must be 'transformers' or 'official', got {layout!r}")
        save_file(state, str(out / "model.safetensors"))
        (out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2))
        return out

    # ------------------------------------------------------------------------------ generation
    def generate(
        self,
        text: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        cfg_scale: float = 3.0,
        temperature: float = 1.2,
        top_p: float = 0.95,
        cfg_filter_top_k: int | None = 45,
        do_sample: bool = True,
        seed: int | None = None,
        progress: bool | None = None,
        decode_audio: bool = True,
    ) -> GenerationResult:
        """Speak ``text`` (one string or a batch). See :class:`GenerationResult`.

        ``max_new_tokens``: decoder steps (at most ``max_new_tokens - 16`` audio frames, ~86 per
        second); default: the model's whole audio budget. ``seed`` makes sampling reproducible.
        ``progress``: a progress bar (default: when stderr is a terminal).
        """
        texts = [text] if isinstance(text, str) else list(text)
        sampling = SamplingConfig(
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_p=top_p,
            cfg_filter_top_k=cfg_filter_top_k,
            do_sample=do_sample,
        )
        ids, mask = encode_batch(texts, self.config.data.text_length)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        out = generate_codes(
            self.model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            generator=generator,
            progress=progress,
            frame_rate=self.codec.frame_rate,
        )
        return self._result(out, decode_audio)

    def decode(self, codes: torch.Tensor) -> np.ndarray:
        """Codec codes [T, C] -> float32 PCM at :attr:`sample_rate`."""
        if codes.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        with torch.inference_mode():
            wav = self.codec.decode(codes[None].to(self.device))
        return wav[0].float().cpu().numpy()

    def _result(self, out: DecodeOutput, decode_audio: bool) -> GenerationResult:
        frames = out.frames(self.config)
        audio = [self.decode(c) if decode_audio else np.zeros(0, np.float32) for c in frames]
        total_frames = sum(int(c.shape[0]) for c in frames)
        stats = {
            "prefill_s": out.prefill_seconds,
            "decode_s": out.decode_seconds,
            "steps": float(out.steps),
            "steps_per_s": out.steps / max(out.decode_seconds, 1e-9),
            "frames": float(total_frames),
        }
        return GenerationResult(frames, audio, self.sample_rate, out.delayed.cpu(), stats)

    def __repr__(self) -> str:
        kind = "random demo" if self.demo else "checkpoint"
        return f"DiaTTS({kind}, device={self.device}, dtype={self.dtype}, codec={type(self.codec).__name__})"

"""``DiaTTS``: a loaded Dia model + audio codec, and ``generate`` from text to audio."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from torch import nn

from . import checkpoint as ckpt
from .codec import check_codec_spec
from .codec.base import AudioCodec
from .config import ConfigError, DiaConfig
from .devices import release_host_memory, resolve_device, resolve_dtype
from .generation.generate import DecodeOutput, check_step_budget, generate_codes
from .generation.sampling import SamplingConfig
from .model import DiaModel, RMSNorm
from .options import check_int_option
from .text import check_prompted_text, encode_batch, encode_text, warn_doubtful_text

if TYPE_CHECKING:
    from .generation.stream import AudioStream

# An audio prompt: a file path or open binary file, samples (numpy / torch; float, or integer PCM) or codec codes
# [T, C] (integer; see DiaTTS.encode_prompt).
PromptLike = str | Path | BinaryIO | np.ndarray | torch.Tensor | None


@dataclass
class GenerationResult:
    """What :meth:`DiaTTS.generate` returns, one entry per input text.

    ``codes``: undelayed codec codes [T_i, C] (int64; BOS/EOS/PAD and the prompt removed);
    ``audio``: float32 mono PCM at ``sample_rate`` (empty when nothing was generated);
    ``delayed``: the raw delayed decoder sequences [B, L, C] (prefix included); ``truncated``: whether
    ``max_new_tokens`` ended each text's speech before the model did (the audio may stop mid-word).
    """

    codes: list[torch.Tensor]
    audio: list[np.ndarray]
    sample_rate: int
    delayed: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    truncated: list[bool] = field(default_factory=list)

    @property
    def durations(self) -> list[float]:
        return [len(a) / self.sample_rate for a in self.audio]


@dataclass(frozen=True)
class _Request:
    """A generation request's checked options (:meth:`DiaTTS._check_request`)."""

    texts: list[str]
    max_new_tokens: int | None
    min_new_tokens: int
    sampling: SamplingConfig
    seed: int | None


def _finish_model(model: DiaModel, device: torch.device, dtype: torch.dtype) -> DiaModel:
    """Move/cast once at load: weights in ``dtype``, norm weights in fp32 with the values they had (a cast through
    ``dtype`` and back would round them; the RoPE tables stay fp32 by themselves)."""
    norms = [(m, m.weight.detach()) for m in model.modules() if isinstance(m, RMSNorm)]
    model.to(device=device, dtype=dtype)
    for m, weight in norms:
        m.weight.data = weight.to(device=device, dtype=torch.float32)
    return model.eval().requires_grad_(False)


def init_random_weights(model: DiaModel, seed: int, std: float = 0.02) -> None:
    """Deterministic random weights (same for a seed on every device): N(0, std) matrices and
    embeddings, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.published_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                values = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            else:
                values = torch.randn(p.shape, generator=gen) * std
            p.copy_(values.to(p.dtype))


def _load_codec(
    codec: AudioCodec | str | Path | None, device: torch.device, where: Path | None, *, demo: bool = False
) -> AudioCodec:
    """The codec of a model loaded from ``where`` (its ``dac/`` or ``codec/``, else ``codec``'s). A random codec (the
    default demo DAC, or one saved from it) warns, except for a demo model (``demo``), which warned already."""
    from .codec import load_codec

    return load_codec(codec, device=device, search_dir=where, warn_demo=not demo)


def _is_prompt_codes(audio: object, channels: int) -> bool:
    """Whether an audio prompt array / tensor holds codec codes: integer and ``[T, channels]``, or int64 (the codes'
    dtype: no audio file holds int64 samples). Other integer samples are PCM (int16, int32, uint8)."""
    if isinstance(audio, torch.Tensor):
        integer = not (audio.is_floating_point() or audio.is_complex() or audio.dtype == torch.bool)
        int64 = audio.dtype == torch.int64
    elif isinstance(audio, np.ndarray):
        integer, int64 = audio.dtype.kind in "iu", audio.dtype == np.int64
    else:
        return False
    return integer and (int64 or (audio.ndim == 2 and audio.shape[1] == channels))


def _remove_sharded_weights(directory: Path) -> None:
    """Remove a sharded checkpoint's ``model.safetensors.index.json`` from ``directory`` and the shard files it names
    (files directly in ``directory`` whose names end in ``.safetensors``; nothing else), so that the
    ``model.safetensors`` just written there is what loads (:func:`~dia_fast.checkpoint.find_weights` prefers an
    index)."""
    index = directory / ckpt.SHARD_INDEX
    if not index.is_file():
        return
    try:
        names = {n for n in json.loads(index.read_text()).get("weight_map", {}).values() if isinstance(n, str)}
    except (OSError, ValueError, AttributeError):
        names = set()  # an unreadable index: it goes, its shards are no longer found by name
    index.unlink()
    for name in map(str, names):
        if Path(name).name == name and name.endswith(".safetensors") and name != "model.safetensors":
            (directory / name).unlink(missing_ok=True)


def _saved_demo(path: str | Path, stacklevel: int) -> bool:
    """Whether a checkpoint holds a saved random-weight demo model (warns when it does, at ``stacklevel``)."""
    demo = ckpt.has_random_weights(path)
    if demo:
        warnings.warn(
            f"{path} holds random weights (saved from a dia_fast demo model, DiaTTS.random): the audio is not speech",
            stacklevel=stacklevel + 1,
        )
    return demo


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
        quantize: str | None = None,
    ) -> DiaTTS:
        """Load a checkpoint: a directory (``config.json`` + weights) or a weights file, in the
        transformers or the official nari-labs layout, or a hub id when the hub is reachable.

        ``codec``: an :class:`AudioCodec`, a codec checkpoint path, ``"dac"``/``"encodec"``; by default
        a ``dac/`` directory inside the checkpoint directory, else a random demo codec (with a warning).
        ``quantize``: ``"int8"`` / ``"fp8"`` / ``"int4"`` quantizes the decoder's GEMMs (:mod:`dia_fast.quantize`;
        a mode the device cannot run is an error before anything loads). The checkpoint is read one tensor at a
        time and each GEMM weight is quantized as it arrives (CPU: dia_fast's int8 / int4 layers; CUDA: dia_fast's int8
        layer, or torchao's as ``quantize.CUDA_INT8_KERNEL`` says, and torchao for fp8 / int4), so the
        full-precision model is never in memory at once. A directory that :meth:`save_pretrained` wrote from a
        quantized model loads quantized as it is, on the CPU or CUDA (another ``quantize`` is an error,
        never a re-quantization).
        """
        from .quantize import check_quantize, load_cuda_quantized, load_quantized
        from .quantized_dir import QUANT_FILE, read_quantization

        if not isinstance(path, (str, Path)):
            raise TypeError(f"path must be a str or Path (a checkpoint directory or file, or a hub id), got {path!r}")
        if not str(path).strip():
            raise ValueError("path is empty: give a checkpoint directory or file (or a hub id)")
        if not (isinstance(path, str) and ckpt.is_hub_id(path)):
            path = Path(path).expanduser()  # once, for every check below (not only the weights' loader)
        check_codec_spec(codec)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if isinstance(path, str) and not Path(path).expanduser().exists():
            check_quantize(quantize, dev, dt)  # (the arguments before a download)
            path = ckpt.resolve_path(path)  # a hub id, fetched first: a saved quantized model is then seen as one
        if Path(path).is_file() and (Path(path).parent / QUANT_FILE).is_file():
            raise ValueError(f"{path} is part of a saved quantized model: load its directory, {Path(path).parent}")
        saved = read_quantization(Path(path)) if Path(path).is_dir() else None
        if saved is not None:
            return cls._from_quantized(Path(path), saved, quantize, dev, dt, codec, config)
        quantize = check_quantize(quantize, dev, dt)
        root = Path(path) if Path(path).is_dir() else Path(path).parent  # a weights file: its codec is beside it
        # read and placed one tensor at a time: the checkpoint is never in memory next to the model
        cfg, tensors, layout = ckpt.load_config_and_tensors(path, config)
        with torch.device("meta"):
            model = DiaModel(cfg)
        source = f"checkpoint {path} ({layout} layout)"
        if quantize is None:
            ckpt.fill_model(model, tensors, dt, source)
        elif dev.type == "cpu":  # each GEMM weight quantized as it arrives
            load_quantized(model, tensors, quantize, dt, source)
        else:  # CUDA: each GEMM quantized on the device (torchao / Int8Linear) once its weight has arrived
            load_cuda_quantized(model, tensors, quantize, dt, dev, source)
        model = _finish_model(model, dev, dt)
        release_host_memory()
        demo = _saved_demo(path, stacklevel=2)
        return cls(model, _load_codec(codec, dev, root, demo=demo), demo=demo)

    @classmethod
    def _from_quantized(
        cls,
        path: Path,
        saved: dict,
        quantize: str | None,
        dev: torch.device,
        dt: torch.dtype,
        codec: AudioCodec | str | Path | None,
        config: DiaConfig | None,
    ) -> DiaTTS:
        """A directory that :meth:`save_pretrained` wrote from a quantized model: loaded as it is, not re-quantized."""
        from .quantize import check_quantize
        from .quantized_dir import check_saved_device, cuda_from_saved, load_saved

        mode = saved["mode"]
        if quantize is not None and quantize != mode:
            raise ValueError(
                f"{path} holds {mode}-quantized weights; it cannot be loaded with quantize={quantize} "
                f"(leave quantize out, or pass {mode!r})"
            )
        check_saved_device(saved, dev, str(path))
        check_quantize(mode, dev, dt)
        cfg = config or DiaConfig.from_json(path / "config.json")
        with torch.device("meta"):
            model = DiaModel(cfg)
        # plain reads (not a memory map: the loaded model must not change with the file, nor fault if it shrinks);
        # a truncated or corrupt file is a CheckpointError
        state = dict(ckpt.iter_tensors([path / "model.safetensors"], check=False))
        load_saved(model, state, saved, str(path))
        if dev.type == "cuda":  # the same values in CUDA's layers (CPU int4: tinygemm's, scales rounded to bf16)
            cuda_from_saved(model, dev, dt)
        model = _finish_model(model, dev, dt)
        demo = _saved_demo(path, stacklevel=3)
        return cls(model, _load_codec(codec, dev, path, demo=demo), demo=demo)

    @classmethod
    def random(
        cls,
        config_or_preset: DiaConfig | str = "tiny",
        *,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        codec: AudioCodec | str | Path | None = None,
        quantize: str | None = None,
    ) -> DiaTTS:
        """Random weights (deterministic for ``seed``): presets ``"tiny"`` and ``"dia-1.6b"``.

        ``config_or_preset``: a :class:`DiaConfig` or a preset name. ``seed``: any int (reduced modulo 2**64).
        Without ``codec`` a small random DAC is used: the audio is a demonstration, not speech.
        ``quantize``: as in :meth:`from_pretrained`.
        """
        from .quantize import check_quantize, quantize_decoder

        if isinstance(config_or_preset, str):
            cfg = DiaConfig.preset(config_or_preset)
        elif isinstance(config_or_preset, DiaConfig):
            cfg = config_or_preset
        else:
            raise TypeError(
                f"config_or_preset must be a DiaConfig or a preset name ('tiny', 'dia-1.6b'), got {config_or_preset!r}"
            )
        seed = check_int_option("seed", seed) % (1 << 64)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        quantize = check_quantize(quantize, dev, dt)
        check_codec_spec(codec)
        with torch.device("meta"):
            model = DiaModel(cfg)
        model.to_empty(device="cpu")
        init_random_weights(model, seed)
        model = _finish_model(model, dev, dt)
        if quantize is not None:
            quantize_decoder(model, quantize)
        if codec is None:  # the demo says it is a demo itself; no warning here
            from .codec import load_codec

            codec = load_codec(None, device=dev, warn_demo=False)
        return cls(model, _load_codec(codec, dev, None), demo=True)

    def save_pretrained(self, directory: str | Path, *, layout: str | None = None, save_codec: bool = True) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in the ``"transformers"`` (default) or ``"official"``
        layout. A quantized model is written in dia_fast's quantized layout instead (the quantized weights with their
        scales, and ``quantization.json``; :mod:`dia_fast.quantized_dir`), which :meth:`from_pretrained` loads back
        as it is: int8 and CPU int4 on either device, CUDA int4 and fp8 on CUDA. The weights of a random model
        (:attr:`demo`) are marked as such in the safetensors metadata: loading them back warns and gives a demo
        model again. A model with cross-attention RoPE (official v0.1 weights) keeps it (see :meth:`_config_doc`;
        the transformers layout warns that transformers cannot run it). ``directory`` may start with ``~``.

        ``save_codec``: the codec goes to ``dac/`` (DAC) or ``codec/`` (EnCodec) inside the directory, where
        :meth:`from_pretrained` finds it, so the directory speaks as this model does; a random codec (the demo
        codec a checkpoint without one got) is marked as random there too, and loading it back warns again as the
        first load did. The weights file is written atomically; a failure (a full disk) is an ``OSError`` naming the
        directory, and a directory this call created is removed again."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        from .audio.io import atomic_output, write_file_bytes
        from .quantize import quantized_mode
        from .quantized_dir import QUANT_FILE, quantized_state

        out = Path(directory).expanduser()
        quantized = quantized_mode(self.model) is not None
        foreign = [n for n, m in self.model.named_modules() if not quantized and not isinstance(m, nn.Linear)
                   and isinstance(getattr(m, "weight_scale", None), torch.Tensor)]  # fmt: skip
        if foreign:  # quantized layers put in by hand (or left by a failed quantize_decoder): no readable layout
            raise ValueError(
                f"the model holds quantized layers ({foreign[0]}, ...) but was not quantized by dia_fast "
                "(DiaTTS.from_pretrained(..., quantize=) or quantize.quantize_decoder): it cannot be saved"
            )
        if quantized and layout is not None:
            raise ValueError(f"a quantized model is saved in dia_fast's quantized layout only, not {layout!r}")
        layout = layout or "transformers"
        if layout not in ("transformers", "official"):
            raise ValueError(f"layout must be 'transformers' or 'official', got {layout!r}")
        config_doc = self._config_doc(layout, quantized)
        codec_dir = self._codec_dir(out) if save_codec else None
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            if quantized:
                state, doc = quantized_state(self.model)
                state = {k: v.cpu() for k, v in state.items()}
            else:
                state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
                if layout == "transformers":
                    state = ckpt.to_transformers(state)
                else:
                    state = ckpt.to_official(state, self.config)
            with atomic_output(out / "model.safetensors") as tmp:
                save_file(state, str(tmp), metadata=self._metadata())
            del state
            _remove_sharded_weights(out)  # an older sharded checkpoint here would be loaded instead
            if quantized:
                write_file_bytes(out / QUANT_FILE, json.dumps(doc, indent=2).encode())
            else:
                (out / QUANT_FILE).unlink(missing_ok=True)  # a full-precision model over a quantized one
            write_file_bytes(out / "config.json", json.dumps(config_doc, indent=2).encode())
            if codec_dir is not None:
                self.codec.save_pretrained(codec_dir)  # type: ignore[attr-defined]
        except (OSError, SafetensorError) as exc:
            if created:
                shutil.rmtree(out, ignore_errors=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OSError(getattr(exc, "errno", None), f"cannot save the model to {out}: {reason}") from None
        return out

    def _config_doc(self, layout: str, quantized: bool) -> dict[str, Any]:
        """The ``config.json`` that :meth:`save_pretrained` writes. A model with cross-attention RoPE (the official
        v0.1 weights, Dia-1.6B) keeps it: the official layout gets the v0.1 config format (what the official v0.1
        code reads), the others the transformers format with a ``"dia_fast"`` block that dia_fast reads back (with
        a warning for the transformers layout: transformers' Dia has no cross-attention RoPE, so it would load
        another model)."""
        if not self.config.model.cross_attention_rope or quantized:
            return self.config.to_dict()
        if layout == "official":
            try:
                return self.config.to_official_v01_dict()
            except ConfigError as exc:
                warnings.warn(
                    f"{exc}: written in the transformers format with a 'dia_fast' block instead, which dia_fast "
                    "reads back as saved but the official code does not",
                    stacklevel=3,
                )
                return self.config.to_dict()
        warnings.warn(
            "this model applies RoPE in cross-attention (an official v0.1 checkpoint, Dia-1.6B), which transformers' "
            "Dia does not implement: transformers would load the saved checkpoint as a different model. dia_fast "
            "reads it back as saved (config.json's 'dia_fast' block); save with layout='official' for the official "
            "v0.1 format",
            stacklevel=3,
        )
        return self.config.to_dict()

    def _codec_dir(self, out: Path) -> Path | None:
        """Where :meth:`save_pretrained` puts the codec (None: this codec cannot be saved)."""
        if not hasattr(self.codec, "save_pretrained"):
            return None
        from .codec.dac import DacCodec

        if isinstance(self.codec, DacCodec):
            return out / "dac"
        if (out / "dac").is_dir():  # from_pretrained would find that one first
            raise ValueError(f"{out / 'dac'} holds another codec: remove it, or save with save_codec=False")
        return out / "codec"

    def _metadata(self) -> dict[str, str]:
        """The saved weights' safetensors metadata: random weights (:meth:`random`) are marked as such."""
        return {"format": "pt", **({ckpt.RANDOM_WEIGHTS_KEY: "true"} if self.demo else {})}

    # ------------------------------------------------------------------------------ generation
    def generate(
        self,
        text: str | Sequence[str],
        *,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        cfg_scale: float = 3.0,
        temperature: float = 1.2,
        top_p: float = 0.95,
        cfg_filter_top_k: int | None = 45,
        do_sample: bool = True,
        seed: int | None = None,
        progress: bool | None = None,
        decode_audio: bool = True,
        audio_prompt: PromptLike | Sequence[PromptLike] = None,
        audio_prompt_text: str | Sequence[str | None] | None = None,
    ) -> GenerationResult:
        """Speak ``text`` (one string or a batch). See :class:`GenerationResult`.

        ``max_new_tokens``: decoder steps (at most ``max_new_tokens - 16`` audio frames, ~86 per
        second); default: the model's whole audio budget left after the prompt (a text the model does not end
        within it warns). :attr:`GenerationResult.truncated` says which texts the limit ended.
        ``min_new_tokens``: no EOS before that many steps (a lower bound on the length). ``seed`` (any int) makes
        sampling reproducible: text ``i`` of a batch draws with ``seed + i``, exactly as a
        :class:`~dia_fast.VoicePool` / :class:`~dia_fast.serving.BatchEngine` request (or the speech server) with
        that seed draws, so the same seed speaks the same audio there (in full precision; a quantized model rounds
        each activation row against its own range, which magnifies the text encoder's batch-size-dependent
        rounding, so a batch can differ from solo runs in a few codes). ``progress``: a progress bar (default: when
        stderr is a terminal).

        Voice cloning: ``audio_prompt`` is an audio file path, a float array at the codec's sample
        rate, or codec codes ``[T, C]`` (from :meth:`encode_prompt`), or a list of those (one per
        text, ``None`` for no prompt). ``audio_prompt_text`` is what the prompt says (e.g.
        ``"[S1] Hello, this is my voice."``); it is put in front of the text, as the model
        expects. The returned audio and codes exclude the prompt.
        """
        sampling = dict(
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_p=top_p,
            cfg_filter_top_k=cfg_filter_top_k,
            do_sample=do_sample,
        )
        request = self._check_request(text, max_new_tokens, min_new_tokens, sampling, seed)
        inputs = self._prompted_batch(request, audio_prompt, audio_prompt_text)
        out = generate_codes(self.model, progress=progress, frame_rate=self.codec.frame_rate, **inputs)
        result = self._result(out, decode_audio)
        if max_new_tokens is None and any(result.truncated) and not self.demo:
            cut = [i for i, t in enumerate(result.truncated) if t]
            warnings.warn(
                f"the model did not end the speech of text(s) {cut} within its whole audio budget "
                f"({self.config.data.audio_length} steps): the audio stops there",
                UserWarning,
                stacklevel=2,
            )
        return result

    def _check_request(
        self,
        text: object,
        max_new_tokens: object,
        min_new_tokens: object,
        sampling: dict[str, object],
        seed: object,
    ) -> _Request:
        """The checks :meth:`generate` and :meth:`generate_stream` make before any work: the texts (each one
        non-empty and within the text budget by itself), the step counts, the sampling options and the seed; then the
        doubts about each text as ``UserWarning`` s (pointing at the caller of the public method)."""
        if isinstance(text, str):
            texts = [text]
        elif isinstance(text, Sequence) and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise TypeError(f"text must be a str or a sequence of str, got {type(text).__name__}")
        if not texts:
            raise ValueError("no texts given")
        request = _Request(
            texts,
            check_int_option("max_new_tokens", max_new_tokens, minimum=1, optional=True),
            check_int_option("min_new_tokens", min_new_tokens, minimum=0),
            SamplingConfig(**sampling),  # type: ignore[arg-type]
            check_int_option("seed", seed, optional=True),
        )
        for t in texts:
            encode_text(t, self.config.data.text_length)  # empty or too long: before a prompt is encoded
        for t in texts:
            warn_doubtful_text(t, stacklevel=4)
        return request

    def _prompted_batch(
        self,
        request: _Request,
        audio_prompt: PromptLike | Sequence[PromptLike],
        audio_prompt_text: str | Sequence[str | None] | None,
    ) -> dict[str, Any]:
        """The prompts encoded, the texts (transcripts in front) tokenized and the step counts checked against the
        audio budget left after the prompts: :func:`generate_codes`' arguments for ``request``."""
        prompts, texts = self._prepare_prompts(request.texts, audio_prompt, audio_prompt_text)
        ids, mask = encode_batch(texts, self.config.data.text_length)
        frames = max(0 if p is None else int(p.shape[0]) for p in prompts or [None])
        check_step_budget(self.config.data, frames, request.max_new_tokens, request.min_new_tokens)
        return dict(
            text_ids=ids,
            text_mask=mask,
            prompts=prompts,
            max_new_tokens=request.max_new_tokens,
            min_new_tokens=request.min_new_tokens,
            sampling=request.sampling,
            # text i draws with seed + i (as the batching engine's request with that seed), or from torch's RNG
            seeds=None if request.seed is None else [request.seed + i for i in range(len(request.texts))],
        )

    # ------------------------------------------------------------------------------ voice prompts
    def max_prompt_frames(self) -> int:
        """The longest audio prompt (codec frames) that leaves room for at least one new frame."""
        data = self.config.data
        return data.audio_length - 1 - (data.max_delay + 2)

    def encode_prompt(self, audio: PromptLike, sample_rate: int | None = None) -> torch.Tensor:
        """An audio prompt as codec codes ``[T, C]`` (int64, on the CPU).

        ``audio``: a file path or an open binary file (WAV/FLAC/OGG/MP3, any rate and channel count: mixed to
        mono and resampled with soxr), an array/tensor of samples (``sample_rate`` defaults to the codec's),
        or already encoded codes ``[T, C]`` (checked and returned). A numpy array and a torch tensor are read alike:
        integer samples are codes when they are ``[T, C]`` or int64 (the codes' dtype), else integer PCM
        (int16 / int32 scaled to [-1, 1), uint8 centred on 128; e.g. a 1-D int16 recording). A prompt under 1 s warns
        (it clones poorly).
        Raises ValueError for empty, silent, too long or malformed prompts.
        """
        data = self.config.data
        if _is_prompt_codes(audio, data.channels):
            codes = torch.as_tensor(audio.astype(np.int64) if isinstance(audio, np.ndarray) else audio)
            codes = codes.detach().to("cpu", torch.long)
            if codes.ndim != 2 or codes.shape[1] != data.channels:
                raise ValueError(
                    f"prompt codes must be [T, {data.channels}], got shape {tuple(codes.shape)} (an int64 array or "
                    "tensor is read as codec codes; integer PCM samples are int16 or int32)"
                )
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codec.codebook_size):
                raise ValueError(f"prompt codes must lie in 0..{self.codec.codebook_size - 1}")
        else:
            from .audio import load_prompt_audio

            if isinstance(audio, (str, Path)) or hasattr(audio, "read"):  # a path or an open binary file
                if sample_rate is not None:
                    raise ValueError("sample_rate is only for arrays: an audio file is read at its own rate")
                src = audio if hasattr(audio, "read") else str(audio)
                samples = load_prompt_audio(src, target_rate=self.codec.sample_rate)
            else:
                rate = self.codec.sample_rate if sample_rate is None else sample_rate
                samples = load_prompt_audio(audio, rate, target_rate=self.codec.sample_rate)
            peak = float(np.max(np.abs(samples))) if samples.size else 0.0
            if peak < 1e-4:
                raise ValueError("the audio prompt is silent (peak below -80 dBFS): give a recording of the voice")
            if samples.shape[0] < self.codec.hop_length:
                raise ValueError(
                    f"the audio prompt holds {samples.shape[0]} samples, less than one codec frame "
                    f"({self.codec.hop_length}): give a recording of the voice (5-10 s is best)"
                )
            frames = -(-samples.shape[0] // self.codec.hop_length)
            self._check_prompt_length(frames)
            seconds = samples.shape[0] / self.codec.sample_rate
            if seconds < 1.0:
                warnings.warn(
                    f"the audio prompt lasts {seconds:.2f} s: prompts under 1 s clone poorly (5-10 s is best)",
                    UserWarning,
                    stacklevel=2,
                )
            wav = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None].to(self.device)
            with torch.inference_mode():
                codes = self.codec.encode(wav)[0].to("cpu", torch.long)
        if codes.shape[0] == 0:
            raise ValueError("the audio prompt is empty (0 codec frames)")
        self._check_prompt_length(int(codes.shape[0]))
        return codes

    def _check_prompt_length(self, frames: int) -> None:
        limit = self.max_prompt_frames()
        if frames > limit:
            rate = self.codec.frame_rate
            raise ValueError(
                f"the audio prompt is {frames / rate:.1f} s ({frames} codec frames) but the model's audio budget "
                f"leaves room for at most {limit / rate:.1f} s ({limit} frames); use a shorter prompt (5-10 s is best)"
            )

    def _prepare_prompts(
        self,
        texts: list[str],
        audio_prompt: PromptLike | Sequence[PromptLike],
        audio_prompt_text: str | Sequence[str | None] | None,
    ) -> tuple[list[torch.Tensor | None] | None, list[str]]:
        """Per-item prompt codes and texts with the transcripts put in front."""
        n = len(texts)
        if audio_prompt is None and audio_prompt_text is None:
            return None, texts
        if isinstance(audio_prompt, (list, tuple)):
            if len(audio_prompt) != n:
                raise ValueError(f"got {len(audio_prompt)} audio prompts for {n} texts")
            prompts_in = list(audio_prompt)
        else:
            prompts_in = [audio_prompt] * n
        if audio_prompt_text is None or isinstance(audio_prompt_text, str):
            transcripts = [audio_prompt_text] * n
        else:
            transcripts = list(audio_prompt_text)
            if len(transcripts) != n:
                raise ValueError(f"got {len(transcripts)} prompt transcripts for {n} texts")
        out_texts = []
        for text, prompt, transcript in zip(texts, prompts_in, transcripts, strict=True):
            if prompt is None:
                if transcript:
                    raise ValueError("audio_prompt_text was given without an audio_prompt")
                out_texts.append(text)
            elif transcript is None or not transcript.strip():
                warnings.warn(
                    "an audio prompt was given without its transcript (audio_prompt_text): Dia continues the "
                    "prompt's speech from the text, so cloning quality suffers badly without it",
                    stacklevel=4,
                )
                out_texts.append(text)
            else:  # the transcript is read in front of the text: both must fit, checked before any prompt is encoded
                out_texts.append(check_prompted_text(text, transcript, self.config.data.text_length))
        cache: dict[int, torch.Tensor] = {}
        prompts: list[torch.Tensor | None] = []
        for prompt in prompts_in:
            if prompt is not None and id(prompt) not in cache:  # one prompt shared by the batch is encoded once
                cache[id(prompt)] = self.encode_prompt(prompt)
            prompts.append(None if prompt is None else cache[id(prompt)])
        return prompts, out_texts

    def generate_stream(
        self,
        text: str,
        *,
        chunk_frames: int = 43,
        first_chunk_frames: int | None = None,
        left_context_frames: int | None = None,
        lookahead_frames: int | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        cfg_scale: float = 3.0,
        temperature: float = 1.2,
        top_p: float = 0.95,
        cfg_filter_top_k: int | None = 45,
        do_sample: bool = True,
        seed: int | None = None,
        progress: bool | None = False,
        audio_prompt: PromptLike = None,
        audio_prompt_text: str | None = None,
        **engine_options: Any,
    ) -> AudioStream:
        """Speak one ``text`` as float32 PCM chunks at :attr:`sample_rate`, yielded while generating (batch 1).

        Chunks of ``chunk_frames`` codec frames (43 ≈ 0.5 s with DAC), ``first_chunk_frames`` for the first one
        (smaller = earlier first audio); the joined chunks equal the one-shot audio of :meth:`generate`.
        ``left_context_frames`` / ``lookahead_frames``: codec frames decoded before / after each chunk so that its
        audio is exact; by default the codec's receptive field
        (:func:`~dia_fast.generation.stream.codec_context_frames`). A chunk is ready once its frames plus the
        lookahead are final, i.e. ``max_delay`` decode steps after the last of them was sampled.

        ``max_new_tokens``, ``min_new_tokens``, the sampling options, ``seed``, ``progress`` and the voice prompt
        (``audio_prompt``: one prompt; encoded before the stream starts, its audio is not streamed) are those of
        :meth:`generate`, checked as it checks them (the same errors and text warnings) when this is called, before
        the stream's worker thread starts. ``engine_options``: ``cuda_graphs``, ``cpu_graphs``, ``sync_every`` of
        :func:`~dia_fast.generation.generate.generate_codes`; any other keyword is a ``TypeError``.

        Returns an :class:`~dia_fast.generation.stream.AudioStream`: an iterator with ``.stats`` (time to first
        audio, ...) and ``.close()`` (also a context manager). Errors during generation are raised from ``next()``.
        """
        from .generation.stream import AudioStream, check_engine_options, check_stream_frames, codec_context_frames

        if not isinstance(text, str):
            raise TypeError(f"streaming takes one text (batch 1): text must be a str, got {type(text).__name__}")
        if isinstance(audio_prompt, (list, tuple)):
            raise TypeError("streaming takes one audio prompt (batch 1), got a list")
        check_stream_frames(chunk_frames, first_chunk_frames, left_context_frames, lookahead_frames)
        check_engine_options(engine_options)
        sampling = dict(
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_p=top_p,
            cfg_filter_top_k=cfg_filter_top_k,
            do_sample=do_sample,
        )
        request = self._check_request(text, max_new_tokens, min_new_tokens, sampling, seed)
        if left_context_frames is None or lookahead_frames is None:  # measured once per codec, then cached
            left, right = codec_context_frames(self.codec, self.device)
            left_context_frames = left if left_context_frames is None else left_context_frames
            lookahead_frames = right if lookahead_frames is None else lookahead_frames
        t0 = time.perf_counter()  # time to first audio counts from here (prompt encoding included)
        inputs = self._prompted_batch(request, audio_prompt, audio_prompt_text)
        return AudioStream(
            self,
            start_time=t0,
            chunk_frames=chunk_frames,
            first_chunk_frames=first_chunk_frames,
            left_context_frames=left_context_frames,
            lookahead_frames=lookahead_frames,
            generate_kwargs=dict(progress=progress, **inputs, **engine_options),
        )

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
            "warmup_s": float(out.warmup_seconds),
            "cuda_graphs": float(out.cuda_graphs),
            "cpu_graph": float(out.cpu_graph),
        }
        return GenerationResult(frames, audio, self.sample_rate, out.delayed.cpu(), stats, out.truncated())

    def __repr__(self) -> str:
        kind = "random demo" if self.demo else "checkpoint"
        return f"DiaTTS({kind}, device={self.device}, dtype={self.dtype}, codec={type(self.codec).__name__})"

"""Native Descript Audio Codec (DAC), the codec released Dia checkpoints speak (44.1 kHz, hop 512,
9 residual codebooks of 1024 entries).

Architecture: a strided convolutional encoder (snake activations, dilated residual units) to a
``hidden_size`` latent, a residual vector quantizer with factorised, L2-normalised codebooks
(nearest neighbour by cosine in ``codebook_dim`` dimensions), and the mirrored transposed-conv
decoder ending in ``tanh``. Weight norm is folded into plain conv weights at load, so inference
is plain ``conv1d`` / ``conv_transpose1d`` calls in any dtype on any device.

Checkpoints: transformers' ``DacModel`` directory (``config.json`` + ``model.safetensors``) and
descript's original ``weights.pth`` (weight-norm ``weight_g``/``weight_v`` keys, descript module
names). Module names here follow the transformers layout, so its state dict loads as is.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import check_state_dict, find_weights, has_random_weights, random_weights_metadata, read_all
from ..options import check_int_option
from ._layers import Snake, fold_weight_norms
from .base import ConfigCodecProperties, as_mono_batch, check_codes

__all__ = ["DacCodec", "DacCodecConfig", "QuantizerOutput"]


@dataclass(frozen=True)
class DacCodecConfig:
    """Shapes of a DAC model. Defaults are descript's 44.1 kHz model used by Dia."""

    encoder_hidden_size: int = 64
    downsampling_ratios: tuple[int, ...] = (2, 4, 8, 8)
    decoder_hidden_size: int = 1536
    upsampling_ratios: tuple[int, ...] = (8, 8, 4, 2)
    n_codebooks: int = 9
    codebook_size: int = 1024
    codebook_dim: int = 8
    hidden_size: int = 1024
    sampling_rate: int = 44100

    def __post_init__(self) -> None:
        object.__setattr__(self, "downsampling_ratios", tuple(int(r) for r in self.downsampling_ratios))
        object.__setattr__(self, "upsampling_ratios", tuple(int(r) for r in self.upsampling_ratios))
        for name in ("encoder_hidden_size", "decoder_hidden_size", "n_codebooks", "codebook_size", "codebook_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DacCodecConfig.{name} must be positive, got {getattr(self, name)}")
        if int(self.hidden_size) <= 0 or int(self.sampling_rate) <= 0:
            raise ValueError("DacCodecConfig.hidden_size and sampling_rate must be positive")
        if not self.downsampling_ratios or not self.upsampling_ratios:
            raise ValueError("DacCodecConfig needs at least one down- and upsampling ratio")
        if any(r <= 0 for r in self.downsampling_ratios + self.upsampling_ratios):
            raise ValueError("DacCodecConfig ratios must be positive")
        if math.prod(self.downsampling_ratios) != math.prod(self.upsampling_ratios):
            raise ValueError(
                f"DacCodecConfig: downsampling {self.downsampling_ratios} and upsampling {self.upsampling_ratios} "
                "ratios must have the same product (the hop length)"
            )
        if self.decoder_hidden_size % (2 ** len(self.upsampling_ratios)) != 0:
            raise ValueError("DacCodecConfig.decoder_hidden_size must be divisible by 2 ** len(upsampling_ratios)")

    @property
    def hop_length(self) -> int:
        """PCM samples per code frame (product of the downsampling ratios)."""
        return math.prod(self.downsampling_ratios)

    @classmethod
    def preset(cls, name: str) -> DacCodecConfig:
        """``"44khz"``: descript's 44.1 kHz model (Dia's codec). ``"tiny"``: the same hop, codebooks and
        sample rate with 8 encoder / 32 decoder channels, for tests and demos."""
        if name == "44khz":
            return cls()
        if name == "tiny":
            return cls(encoder_hidden_size=8, decoder_hidden_size=32, hidden_size=8 * 2**4)
        raise ValueError(f"unknown DAC preset {name!r}; expected '44khz' or 'tiny'")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> DacCodecConfig:
        """From a transformers ``DacConfig`` dict (``config.json``); missing fields take transformers'
        defaults (note: its default ``sampling_rate`` is 16000)."""
        if d.get("model_type", "dac") != "dac":
            raise ValueError(f"not a DAC config: model_type={d.get('model_type')!r}")
        down = tuple(d.get("downsampling_ratios", (2, 4, 8, 8)))
        enc = int(d.get("encoder_hidden_size", 64))
        return cls(
            encoder_hidden_size=enc,
            downsampling_ratios=down,
            decoder_hidden_size=int(d.get("decoder_hidden_size", 1536)),
            upsampling_ratios=tuple(d.get("upsampling_ratios") or down[::-1]),
            n_codebooks=int(d.get("n_codebooks", 9)),
            codebook_size=int(d.get("codebook_size", 1024)),
            codebook_dim=int(d.get("codebook_dim", 8)),
            hidden_size=int(d.get("hidden_size") or enc * 2 ** len(down)),
            sampling_rate=int(d.get("sampling_rate", 16000)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers ``DacConfig``-compatible ``config.json`` dict."""
        d: dict[str, Any] = asdict(self)
        d["downsampling_ratios"] = list(self.downsampling_ratios)
        d["upsampling_ratios"] = list(self.upsampling_ratios)
        d.update(
            model_type="dac",
            architectures=["DacModel"],
            hop_length=self.hop_length,
            quantizer_dropout=0.0,
            commitment_loss_weight=0.25,
            codebook_loss_weight=1.0,
        )
        return d

    @classmethod
    def from_descript_kwargs(cls, kw: dict[str, Any]) -> DacCodecConfig:
        """From the ``metadata["kwargs"]`` of descript's ``weights.pth`` (the ``DAC(...)`` arguments)."""
        enc = int(kw.get("encoder_dim", 64))
        down = tuple(kw.get("encoder_rates", (2, 4, 8, 8)))
        cdim = kw.get("codebook_dim", 8)
        if isinstance(cdim, (list, tuple)):
            if len(set(cdim)) != 1:
                raise ValueError(f"per-codebook dimensions {cdim} are not supported (all must be equal)")
            cdim = cdim[0]
        return cls(
            encoder_hidden_size=enc,
            downsampling_ratios=down,
            decoder_hidden_size=int(kw.get("decoder_dim", 1536)),
            upsampling_ratios=tuple(kw.get("decoder_rates", (8, 8, 4, 2))),
            n_codebooks=int(kw.get("n_codebooks", 9)),
            codebook_size=int(kw.get("codebook_size", 1024)),
            codebook_dim=int(cdim),
            hidden_size=int(kw.get("latent_dim") or enc * 2 ** len(down)),
            sampling_rate=int(kw.get("sample_rate", 44100)),
        )


class QuantizerOutput(NamedTuple):
    """What the residual vector quantizer produces for an encoder latent [B, hidden_size, T]."""

    quantized: torch.Tensor  # [B, hidden_size, T] float32: sum of the codebooks' contributions
    codes: torch.Tensor  # [B, n_codebooks, T] int64
    latents: torch.Tensor  # [B, n_codebooks * codebook_dim, T] float32: projections before the lookup


# ---------------------------------------------------------------------------------------------
# Modules (attribute names follow transformers' DacModel so that its state dict loads directly)


class _ResidualUnit(nn.Module):
    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        self.snake1 = Snake(channels)
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake(channels)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # "same" padding: the branch keeps the length, so no cropping of the skip path is needed.
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))


def _residual_units(channels: int) -> tuple[_ResidualUnit, _ResidualUnit, _ResidualUnit]:
    return _ResidualUnit(channels, 1), _ResidualUnit(channels, 3), _ResidualUnit(channels, 9)


class _EncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.res_unit1, self.res_unit2, self.res_unit3 = _residual_units(in_channels)
        self.snake1 = Snake(in_channels)
        self.conv1 = nn.Conv1d(
            in_channels, out_channels, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_unit3(self.res_unit2(self.res_unit1(x)))
        return self.conv1(self.snake1(x))


class _DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.snake1 = Snake(in_channels)
        self.conv_t1 = nn.ConvTranspose1d(
            in_channels, out_channels, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)
        )
        self.res_unit1, self.res_unit2, self.res_unit3 = _residual_units(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_t1(self.snake1(x))
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class _Encoder(nn.Module):
    def __init__(self, cfg: DacCodecConfig) -> None:
        super().__init__()
        ch = cfg.encoder_hidden_size
        self.conv1 = nn.Conv1d(1, ch, kernel_size=7, padding=3)
        blocks = []
        for stride in cfg.downsampling_ratios:
            blocks.append(_EncoderBlock(ch, 2 * ch, stride))
            ch *= 2
        self.block = nn.ModuleList(blocks)
        self.snake1 = Snake(ch)
        self.conv2 = nn.Conv1d(ch, cfg.hidden_size, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class _Decoder(nn.Module):
    def __init__(self, cfg: DacCodecConfig) -> None:
        super().__init__()
        ch = cfg.decoder_hidden_size
        self.conv1 = nn.Conv1d(cfg.hidden_size, ch, kernel_size=7, padding=3)
        blocks = []
        for stride in cfg.upsampling_ratios:
            blocks.append(_DecoderBlock(ch, ch // 2, stride))
            ch //= 2
        self.block = nn.ModuleList(blocks)
        self.snake1 = Snake(ch)
        self.conv2 = nn.Conv1d(ch, 1, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for block in self.block:
            x = block(x)
        return torch.tanh(self.conv2(self.snake1(x)))


class _VectorQuantizer(nn.Module):
    def __init__(self, cfg: DacCodecConfig) -> None:
        super().__init__()
        self.in_proj = nn.Conv1d(cfg.hidden_size, cfg.codebook_dim, kernel_size=1)
        self.out_proj = nn.Conv1d(cfg.codebook_dim, cfg.hidden_size, kernel_size=1)
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)


def _conv1x1_f32(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.float()
    return F.conv1d(x, conv.weight.float(), bias)


class _ResidualQuantizer(nn.Module):
    def __init__(self, cfg: DacCodecConfig) -> None:
        super().__init__()
        self.quantizers = nn.ModuleList(_VectorQuantizer(cfg) for _ in range(cfg.n_codebooks))

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        """Residual VQ of ``z`` [B, H, T], in float32 whatever the weights' dtype (the nearest-code
        search is sensitive to rounding, and these projections are cheap)."""
        residual = z.float()
        quantized = torch.zeros_like(residual)
        codes, latents = [], []
        for q in self.quantizers:
            codebook = q.codebook.weight.float()
            z_e = _conv1x1_f32(residual, q.in_proj)  # [B, D, T]
            idx = _nearest_code(z_e, codebook)  # [B, T]
            z_q = F.embedding(idx, codebook).transpose(1, 2)
            # The reference writes the straight-through estimator as z_e + (z_q - z_e); the value is z_q
            # up to rounding, and keeping that rounding keeps later codebooks' residuals identical.
            z_q = z_e + (z_q - z_e)
            out = _conv1x1_f32(z_q, q.out_proj)
            quantized = quantized + out
            residual = residual - out
            codes.append(idx)
            latents.append(z_e)
        return QuantizerOutput(quantized, torch.stack(codes, dim=1), torch.cat(latents, dim=1))

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, T, C] -> the quantized latent [B, H, T]. All codebooks in one lookup and one matmul:
        ``sum_i out_proj_i(codebook_i[c_i]) == cat_i(codebook_i[c_i]) @ cat_i(W_i).T + sum_i b_i``."""
        table = torch.stack([q.codebook.weight for q in self.quantizers])  # [C, K, D]
        emb = table[torch.arange(len(self.quantizers), device=codes.device), codes]  # [B, T, C, D]
        weight = torch.cat([q.out_proj.weight[:, :, 0] for q in self.quantizers], dim=1)  # [H, C*D]
        bias = torch.stack([q.out_proj.bias for q in self.quantizers]).sum(0)
        return F.linear(emb.flatten(2), weight, bias).transpose(1, 2)


def _nearest_code(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the codebook row closest to each latent frame after L2-normalising both (so the
    nearest row is the one of highest cosine). [B, D, T] x [K, D] -> [B, T]."""
    b, d, t = latents.shape
    e = F.normalize(latents.transpose(1, 2).reshape(b * t, d))
    c = F.normalize(codebook)
    # Written as the squared euclidean distance, the way the codebooks were trained and searched.
    dist = e.pow(2).sum(1, keepdim=True) - 2 * e @ c.t() + c.pow(2).sum(1, keepdim=True).t()
    return (-dist).argmax(dim=1).reshape(b, t)


# ---------------------------------------------------------------------------------------------
# Checkpoint reading


def _descript_prefixes(cfg: DacCodecConfig) -> dict[str, str]:
    """Module prefix in descript's ``DAC`` (nested ``nn.Sequential``s) -> the prefix here."""
    m: dict[str, str] = {}
    unit_layers = ("snake1", "conv1", "snake2", "conv2")  # the 4 layers of a residual unit's Sequential

    def unit(dst: str, src: str) -> None:
        for i, name in enumerate(unit_layers):
            m[f"{src}.block.{i}"] = f"{dst}.{name}"

    n_enc = len(cfg.downsampling_ratios)
    m["encoder.block.0"] = "encoder.conv1"
    for i in range(n_enc):
        src, dst = f"encoder.block.{i + 1}.block", f"encoder.block.{i}"
        for j in range(3):
            unit(f"{dst}.res_unit{j + 1}", f"{src}.{j}")
        m[f"{src}.3"] = f"{dst}.snake1"
        m[f"{src}.4"] = f"{dst}.conv1"
    m[f"encoder.block.{n_enc + 1}"] = "encoder.snake1"
    m[f"encoder.block.{n_enc + 2}"] = "encoder.conv2"

    n_dec = len(cfg.upsampling_ratios)
    m["decoder.model.0"] = "decoder.conv1"
    for i in range(n_dec):
        src, dst = f"decoder.model.{i + 1}.block", f"decoder.block.{i}"
        m[f"{src}.0"] = f"{dst}.snake1"
        m[f"{src}.1"] = f"{dst}.conv_t1"
        for j in range(3):
            unit(f"{dst}.res_unit{j + 1}", f"{src}.{j + 2}")
    m[f"decoder.model.{n_dec + 1}"] = "decoder.snake1"
    m[f"decoder.model.{n_dec + 2}"] = "decoder.conv2"
    return m


_PARAM_SUFFIXES = (
    ".parametrizations.weight.original0",
    ".parametrizations.weight.original1",
    ".weight_g",
    ".weight_v",
    ".weight",
    ".bias",
    ".alpha",
)


def _rename_descript(state: dict[str, torch.Tensor], cfg: DacCodecConfig) -> dict[str, torch.Tensor]:
    """descript key names -> transformers/ours. Unknown keys keep their name (reported as unexpected)."""
    prefixes = _descript_prefixes(cfg)
    out = {}
    for key, value in state.items():
        new = key
        if not key.startswith("quantizer."):  # the quantizer's names are the same in both layouts
            for suffix in _PARAM_SUFFIXES:
                if key.endswith(suffix) and key[: -len(suffix)] in prefixes:
                    new = prefixes[key[: -len(suffix)]] + suffix
                    break
        out[new] = value
    return out


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"cannot read {path} as a torch checkpoint with weights_only=True: {exc}") from exc


def _read_checkpoint(path: Path) -> tuple[DacCodecConfig, dict[str, torch.Tensor]]:
    """(config, state dict in our names with weight norm folded) for any supported layout."""
    if path.is_dir():
        if (path / "config.json").exists():
            files = find_weights(path)
            if len(files) == 1 and files[0].suffix == ".pth":  # descript's weights.pth keeps its own names
                return _read_checkpoint(files[0])
            cfg = DacCodecConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
            return cfg, fold_weight_norms(read_all(files), f"DAC checkpoint {path}")
        pths = sorted(path.glob("*.pth"))
        preferred = [p for p in pths if p.name == "weights.pth"]
        if len(preferred) == 1 or len(pths) == 1:
            return _read_checkpoint((preferred or pths)[0])
        found = ", ".join(p.name for p in pths) or "nothing"
        raise FileNotFoundError(
            f"{path}: expected a transformers DAC directory (config.json + model.safetensors) or one descript "
            f"weights .pth file; found {found}"
        )
    if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        if not (path.parent / "config.json").exists():
            raise FileNotFoundError(f"{path}: a safetensors DAC checkpoint needs a config.json next to it")
        return _read_checkpoint(path.parent)
    obj = _load_torch(path)
    if isinstance(obj, dict) and "state_dict" in obj and "metadata" in obj:  # descript's weights.pth
        kwargs = (obj["metadata"] or {}).get("kwargs")
        if not isinstance(kwargs, dict):
            raise ValueError(f"{path}: descript checkpoint without metadata['kwargs'] (the DAC(...) arguments)")
        cfg = DacCodecConfig.from_descript_kwargs(kwargs)
        return cfg, _rename_descript(fold_weight_norms(obj["state_dict"], f"DAC checkpoint {path}"), cfg)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not (path.parent / "config.json").exists():
            raise FileNotFoundError(f"{path}: a plain DAC state dict needs a config.json next to it")
        cfg = DacCodecConfig.from_hf_dict(json.loads((path.parent / "config.json").read_text()))
        return cfg, fold_weight_norms(obj, f"DAC checkpoint {path}")
    raise ValueError(f"{path}: not a DAC checkpoint (expected descript's weights.pth or a state dict)")


# ---------------------------------------------------------------------------------------------
# The codec


class DacCodec(ConfigCodecProperties, nn.Module):
    """Descript Audio Codec: mono PCM at ``sample_rate`` <-> codes [B, T, n_codebooks].

    Implements :class:`dia_fast.codec.AudioCodec`. Use :meth:`from_pretrained` for real weights and
    :meth:`random` for a deterministic random codec; move with ``.to(device, dtype)``.
    """

    def __init__(self, config: DacCodecConfig | None = None) -> None:
        super().__init__()
        self.config = config or DacCodecConfig()
        self.encoder = _Encoder(self.config)
        self.quantizer = _ResidualQuantizer(self.config)
        self.decoder = _Decoder(self.config)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.decoder.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.decoder.conv1.weight.device

    # --- encode ------------------------------------------------------------------------------

    def _prepare_wav(self, wav: torch.Tensor) -> torch.Tensor:
        """[N] / [B, N] / [B, 1, N] float PCM -> [B, 1, N'] in the model dtype, right-padded with zeros
        to a multiple of the hop length (as descript's ``preprocess``)."""
        wav = as_mono_batch(wav)
        pad = -wav.shape[-1] % self.hop_length
        wav = wav.to(device=self.device, dtype=self.dtype)
        return F.pad(wav, (0, pad)) if pad else wav

    @torch.no_grad()
    def encode_latent(self, wav: torch.Tensor) -> torch.Tensor:
        """The encoder's continuous latent [B, hidden_size, ceil(N / hop_length)] (before quantization)."""
        return self.encoder(self._prepare_wav(wav))

    @torch.no_grad()
    def quantize(self, latent: torch.Tensor) -> QuantizerOutput:
        """Residual vector quantization of an encoder latent [B, hidden_size, T] (computed in float32)."""
        return self.quantizer.quantize(latent)

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Float PCM [N], [B, N] or [B, 1, N] at :attr:`sample_rate` -> int64 codes [B, T, n_codebooks],
        ``T = ceil(N / hop_length)`` (the input is right-padded with zeros to whole frames)."""
        return self.quantize(self.encode_latent(wav)).codes.transpose(1, 2)

    # --- decode ------------------------------------------------------------------------------

    @torch.no_grad()
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, T, n_codebooks] -> the quantized latent [B, hidden_size, T] in the model dtype."""
        return self.quantizer.dequantize(check_codes(codes, self, self.device))

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Quantized latent [B, hidden_size, T] -> float32 PCM [B, T * hop_length] in [-1, 1].

        An odd upsampling ratio (descript's 16 and 24 kHz models: 8, 5, 4, 2) makes its transposed convolution one
        sample short (descript's code and transformers' too: T * hop - 8 there); the missing end is zeros here, so
        that every DAC keeps the codec contract of ``T * hop_length`` samples and chunks join."""
        wav = self.decoder(latent.to(device=self.device, dtype=self.dtype)).squeeze(1).float()
        short = latent.shape[-1] * self.hop_length - wav.shape[-1]
        return F.pad(wav, (0, short)) if short > 0 else wav

    # a decode window at the start needs no frames beyond its lookahead (zero-padded convolutions)
    min_window_frames = 1

    @property
    def context_frames(self) -> int:
        """Frames of context on each side that decide one output frame (the decoder's receptive field,
        rounded up): decoding a chunk with this much context on both sides gives the same samples as
        decoding the whole sequence."""
        cfg = self.config
        steps = 3.0  # decoder.conv1: kernel 7 at the frame rate
        rate = 1
        for stride in cfg.upsampling_ratios:
            steps += 1 / rate  # transposed conv (kernel 2*stride): one input step either side
            rate *= stride
            steps += 3 * (1 + 3 + 9) / rate  # three residual units: kernel 7, dilations 1, 3, 9
        steps += 3 / rate  # decoder.conv2: kernel 7 at the sample rate
        return math.ceil(steps) + 1

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, chunk_frames: int | None = 1024) -> torch.Tensor:
        """Int codes [B, T, n_codebooks] (or [T, n_codebooks]) -> float32 PCM [B, T * hop_length].

        Sequences longer than ``chunk_frames`` are decoded in chunks, each with
        :attr:`context_frames` of context either side, which bounds peak memory (the last decoder
        stages hold [B, 96, samples] activations) and matches whole decoding up to rounding.
        ``chunk_frames=None`` decodes in one go.
        """
        chunk_frames = check_int_option("chunk_frames", chunk_frames, minimum=1, optional=True)
        codes = check_codes(codes, self, self.device)
        b, t = codes.shape[:2]
        if t == 0:
            return torch.zeros(b, 0, device=self.device)
        latent = self.quantizer.dequantize(codes)
        if chunk_frames is None or t <= chunk_frames:
            return self.decode_latent(latent)
        hop, ctx = self.hop_length, self.context_frames
        out = torch.empty(b, t * hop, device=self.device)
        for start in range(0, t, chunk_frames):
            end = min(t, start + chunk_frames)
            lo, hi = max(0, start - ctx), min(t, end + ctx)
            wav = self.decode_latent(latent[..., lo:hi])
            out[:, start * hop : end * hop] = wav[:, (start - lo) * hop : (end - lo) * hop]
        return out

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def random(cls, preset: str | DacCodecConfig = "tiny", seed: int = 0) -> DacCodec:
        """A DAC with deterministic random weights (for tests and demos; the audio is not speech).

        Scales keep activations O(1) through the residual stacks, so the encoder spreads frames over
        many codes and the decoder produces non-trivial (non-silent, non-clipped) audio.
        """
        cfg = preset if isinstance(preset, DacCodecConfig) else DacCodecConfig.preset(preset)
        model = cls(cfg)
        gen = torch.Generator().manual_seed(seed)

        def normal(shape: torch.Size, std: float) -> torch.Tensor:
            return torch.randn(shape, generator=gen) * std

        with torch.no_grad():
            for name, module in sorted(model.named_modules(), key=lambda kv: kv[0]):
                if isinstance(module, Snake):
                    module.alpha.copy_(0.5 + torch.rand(module.alpha.shape, generator=gen))
                elif isinstance(module, nn.Embedding):
                    module.weight.copy_(normal(module.weight.shape, 1.0))
                elif isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                    w = module.weight
                    if isinstance(module, nn.ConvTranspose1d):  # [in, out, k]: each output sees in*k/stride taps
                        fan_in = w.shape[0] * w.shape[2] / module.stride[0]
                    else:
                        fan_in = w.shape[1] * w.shape[2]
                    gain = 1.0
                    if name.endswith("conv2") and "res_unit" in name:
                        gain = 0.3  # residual branches enter the skip path scaled down: the stacks stay O(1)
                    elif name.endswith("out_proj"):
                        gain = 1 / math.sqrt(cfg.n_codebooks)  # the codebooks' contributions add up
                    elif name == "decoder.conv2":
                        gain = 0.15  # speech-like level, well inside tanh's linear range
                    w.copy_(normal(w.shape, gain / math.sqrt(fan_in)))
                    if module.bias is not None:
                        module.bias.copy_(normal(module.bias.shape, 0.02))
        return model.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> DacCodec:
        """Load a transformers ``DacModel`` directory (``config.json`` + ``model.safetensors``; or one of
        those files) or descript's original ``weights.pth`` (a file, or a directory holding it). Weight
        norm is folded into plain weights. Key names and shapes are checked strictly."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"DAC checkpoint not found: {path}")
        cfg, state = _read_checkpoint(path)
        with torch.device("meta"):  # no point initialising weights that are about to be replaced
            model = cls(cfg)
        check_state_dict({k: v.shape for k, v in model.state_dict().items()}, state, f"DAC checkpoint {path}")
        state = {k: v.float().contiguous() for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        weights = path / "model.safetensors" if path.is_dir() else path
        model.random_weights = weights.suffix == ".safetensors" and weights.is_file() and has_random_weights(weights)
        return model.to(device=device, dtype=dtype).eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write transformers' layout: ``config.json`` (model_type ``"dac"``) + ``model.safetensors``. A random
        codec (``random_weights``: the demo codec) is marked so in the safetensors metadata, as the model's random
        weights are (:data:`~dia_fast.checkpoint.RANDOM_WEIGHTS_KEY`)."""
        from safetensors.torch import save_file

        out = Path(directory).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.config.to_hf_dict(), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"), metadata=random_weights_metadata(self))

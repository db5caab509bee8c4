"""EnCodec 24 kHz, written natively: SEANet encoder/decoder (causal convolutions + LSTM) and a
residual vector quantizer, used with 9 codebooks of 1024 codes (6.75 kbps at 75 frames/s, hop 320).

It computes what transformers' ``EncodecModel`` computes (same weights give the same codes and audio)
and reads two checkpoint layouts:

- **transformers** (``EncodecModel.save_pretrained``): ``config.json`` (``model_type: "encodec"``) +
  ``model.safetensors``; convolutions weight-normed as ``...parametrizations.weight.original0/1``
  (or the legacy ``...weight_g/weight_v``).
- **encodec package** (facebookresearch/encodec, e.g. ``encodec_24khz-d7cc33bc.th``): a plain
  state dict with keys such as ``encoder.model.0.conv.conv.weight_g`` and
  ``quantizer.vq.layers.0._codebook.embed``.

Weight norm is folded into plain convolution weights on load (``w = g * v / ||v||``), so inference
runs ordinary ``conv1d`` / ``conv_transpose1d``. Only the mono, un-normalised, un-chunked
configuration (the 24 kHz model's) is supported: the 48 kHz model needs per-chunk scales that the
:class:`~dia_fast.codec.base.AudioCodec` interface does not carry.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..checkpoint import (
    CheckpointError,
    check_state_dict,
    has_random_weights,
    random_weights_metadata,
    read_tensors,
    resolve_path,
)
from ._layers import fold_weight_norms, unfold_weight_norm
from .base import ConfigCodecProperties, as_mono_batch, check_codes

__all__ = ["EncodecCodec", "EncodecCodecConfig"]

Tensors = dict[str, torch.Tensor]

# Codebook buffers that only matter for training (EMA k-means): accepted on load, ignored.
_TRAINING_BUFFERS = ("inited", "cluster_size", "embed_avg")


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EncodecCodecConfig:
    """The parts of transformers' ``EncodecConfig`` the codec needs (same field names).

    Defaults are facebook/encodec_24khz. ``bandwidth`` picks how many codebooks are used
    (``floor(bandwidth * 1000 / (log2(codebook_size) * frame_rate))``): 6.75 kbps -> 9.
    """

    sampling_rate: int = 24_000
    audio_channels: int = 1
    num_filters: int = 32
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 2)
    hidden_size: int = 128
    codebook_size: int = 1024
    codebook_dim: int = 128
    num_lstm_layers: int = 2
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    use_causal_conv: bool = True
    norm_type: str = "weight_norm"
    pad_mode: str = "reflect"
    compress: int = 2
    trim_right_ratio: float = 1.0
    use_conv_shortcut: bool = True
    normalize: bool = False
    chunk_length_s: float | None = None
    overlap: float | None = None
    # Bandwidths the checkpoint was trained for; the last one fixes how many codebooks it holds.
    target_bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
    # Bandwidth used by this codec (not an EncodecConfig field).
    bandwidth: float = 6.75

    def __post_init__(self) -> None:
        object.__setattr__(self, "upsampling_ratios", tuple(int(r) for r in self.upsampling_ratios))
        object.__setattr__(self, "target_bandwidths", tuple(float(b) for b in self.target_bandwidths))
        if self.audio_channels != 1:
            raise ValueError(f"EncodecCodec supports mono models only (audio_channels=1), got {self.audio_channels}")
        if self.normalize:
            raise ValueError("EncodecCodec does not support normalize=True (per-chunk scales, the 48 kHz model)")
        if self.chunk_length_s is not None:
            raise ValueError("EncodecCodec does not support chunked models (chunk_length_s must be None)")
        if self.norm_type != "weight_norm":
            raise ValueError(f"EncodecCodec supports norm_type='weight_norm' only, got {self.norm_type!r}")
        if self.codebook_dim != self.hidden_size:
            raise ValueError(f"codebook_dim ({self.codebook_dim}) must equal hidden_size ({self.hidden_size})")
        if self.codebook_size < 2 or self.codebook_size & (self.codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of 2, got {self.codebook_size}")
        if not 0.0 <= self.trim_right_ratio <= 1.0 or (not self.use_causal_conv and self.trim_right_ratio != 1.0):
            raise ValueError(f"trim_right_ratio must be in [0, 1] (and 1 for non-causal), got {self.trim_right_ratio}")
        if self.pad_mode not in ("reflect", "constant", "replicate", "circular"):
            raise ValueError(f"unknown pad_mode {self.pad_mode!r}")
        if not 1 <= self.n_codebooks <= self.num_quantizers:
            raise ValueError(
                f"bandwidth {self.bandwidth} kbps selects {self.n_codebooks} codebooks; "
                f"the model has {self.num_quantizers} (target_bandwidths {self.target_bandwidths})"
            )

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        # transformers rounds up; 24000 / 320 = 75 exactly.
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def bits_per_codebook(self) -> int:
        return int(math.log2(self.codebook_size))

    @property
    def num_quantizers(self) -> int:
        """Codebooks in the checkpoint (enough for the largest target bandwidth)."""
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.bits_per_codebook))

    @property
    def n_codebooks(self) -> int:
        """Codebooks used at ``bandwidth``."""
        return max(1, math.floor(self.bandwidth * 1000 / (self.bits_per_codebook * self.frame_rate)))

    @classmethod
    def preset(cls, name: str = "24khz") -> EncodecCodecConfig:
        """``"24khz"`` (facebook/encodec_24khz) or ``"tiny"`` (small widths for tests and demos,
        same hop 320, 1024 codes and 9 codebooks)."""
        if name == "24khz":
            return cls()
        if name == "tiny":
            return cls(num_filters=4, hidden_size=16, codebook_dim=16, num_lstm_layers=1, target_bandwidths=(6.75,))
        raise ValueError(f"unknown EnCodec preset {name!r}; expected '24khz' or 'tiny'")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncodecCodecConfig:
        """From a transformers ``EncodecConfig`` dict (``config.json``); unknown keys are ignored."""
        if d.get("model_type", "encodec") != "encodec":
            raise ValueError(f"not an EnCodec config (model_type={d.get('model_type')!r})")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        if "chunk_length_s" in d:  # None is meaningful here
            kwargs["chunk_length_s"] = d["chunk_length_s"]
        if kwargs.get("codebook_dim") is None:
            kwargs["codebook_dim"] = kwargs.get("hidden_size", cls.hidden_size)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """transformers' ``EncodecConfig`` fields (``bandwidth`` kept under its own name)."""
        d = asdict(self)
        d["upsampling_ratios"] = list(self.upsampling_ratios)
        d["target_bandwidths"] = list(self.target_bandwidths)
        return {"model_type": "encodec", "architectures": ["EncodecModel"], **d}


# ---------------------------------------------------------------------------------------------- layers


def _pad1d(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """``F.pad`` on the time axis; reflect padding of inputs shorter than the pad first extends them
    with zeros on the right (as EnCodec does), so very short clips still encode."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode=mode)
    length = x.shape[-1]
    extra = max(left, right) - length + 1 if length <= max(left, right) else 0
    if extra:
        x = F.pad(x, (0, extra))
    x = F.pad(x, (left, right), mode="reflect")
    return x[..., : x.shape[-1] - extra]


class _Conv(nn.Module):
    """Conv1d that pads its own input (causally, or centred) so that T_out = ceil(T_in / stride)."""

    def __init__(
        self, cfg: EncodecCodecConfig, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, dilation=dilation)
        self.causal = cfg.use_causal_conv
        self.pad_mode = cfg.pad_mode
        self.stride = stride
        self.padding = (kernel - 1) * dilation + 1 - stride  # effective kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Extra right padding so the last window is complete: the length becomes a multiple of the stride.
        extra = -x.shape[-1] % self.stride
        if self.causal:
            left, right = self.padding, 0
        else:
            right = self.padding // 2
            left = self.padding - right
        return self.conv(_pad1d(x, left, right + extra, self.pad_mode))


class _ConvTranspose(nn.Module):
    """ConvTranspose1d that trims its ``kernel - stride`` overhang (on the right when causal)."""

    def __init__(self, cfg: EncodecCodecConfig, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(c_in, c_out, kernel, stride)
        overhang = kernel - stride
        if cfg.use_causal_conv:
            self.trim_right = math.ceil(overhang * cfg.trim_right_ratio)
        else:
            self.trim_right = overhang // 2
        self.trim_left = overhang - self.trim_right

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., self.trim_left : y.shape[-1] - self.trim_right]


class _LSTM(nn.Module):
    """Stacked LSTM over time with a residual connection, on [B, C, T] tensors."""

    def __init__(self, dim: int, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.permute(2, 0, 1)  # [T, B, C]
        return (self.lstm(seq)[0] + seq).permute(1, 2, 0)


class _ResidualUnit(nn.Module):
    """ELU -> conv k (dilated, to dim // compress) -> ELU -> conv 1 (back to dim), plus a 1x1-conv skip."""

    def __init__(self, cfg: EncodecCodecConfig, dim: int, dilation: int) -> None:
        super().__init__()
        hidden = dim // cfg.compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                _Conv(cfg, dim, hidden, cfg.residual_kernel_size, dilation=dilation),
                nn.ELU(),
                _Conv(cfg, hidden, dim, 1),
            ]
        )
        self.shortcut = _Conv(cfg, dim, dim, 1) if cfg.use_conv_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.block:
            y = layer(y)
        return self.shortcut(x) + y


class _Encoder(nn.Module):
    """SEANet encoder: audio [B, 1, N] -> latents [B, hidden_size, ceil(N / hop)]."""

    def __init__(self, cfg: EncodecCodecConfig) -> None:
        super().__init__()
        width = cfg.num_filters
        layers: list[nn.Module] = [_Conv(cfg, cfg.audio_channels, width, cfg.kernel_size)]
        for ratio in reversed(cfg.upsampling_ratios):
            layers += [_ResidualUnit(cfg, width, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers)]
            layers += [nn.ELU(), _Conv(cfg, width, width * 2, 2 * ratio, stride=ratio)]
            width *= 2
        layers += [
            _LSTM(width, cfg.num_lstm_layers),
            nn.ELU(),
            _Conv(cfg, width, cfg.hidden_size, cfg.last_kernel_size),
        ]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _Decoder(nn.Module):
    """SEANet decoder: latents [B, hidden_size, T] -> audio [B, 1, T * hop]."""

    def __init__(self, cfg: EncodecCodecConfig) -> None:
        super().__init__()
        width = cfg.num_filters * 2 ** len(cfg.upsampling_ratios)
        layers: list[nn.Module] = [
            _Conv(cfg, cfg.hidden_size, width, cfg.kernel_size),
            _LSTM(width, cfg.num_lstm_layers),
        ]
        for ratio in cfg.upsampling_ratios:
            layers += [nn.ELU(), _ConvTranspose(cfg, width, width // 2, 2 * ratio, stride=ratio)]
            width //= 2
            layers += [_ResidualUnit(cfg, width, cfg.dilation_growth_rate**j) for j in range(cfg.num_residual_layers)]
        layers += [nn.ELU(), _Conv(cfg, width, cfg.audio_channels, cfg.last_kernel_size)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class _Codebook(nn.Module):
    """One VQ codebook: nearest entry by Euclidean distance, and lookup."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("embed", torch.zeros(size, dim))

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, D] -> indices [M]."""
        # Full ||x||^2 - 2 x.e + ||e||^2 (not just the last two terms) to round like the reference.
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return dist.argmin(dim=-1)


class _ResidualVQ(nn.Module):
    """Residual vector quantizer: each codebook quantizes what the previous ones left over."""

    def __init__(self, cfg: EncodecCodecConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Codebook(cfg.codebook_size, cfg.codebook_dim) for _ in range(cfg.num_quantizers))

    def encode(self, latents: torch.Tensor, n: int) -> torch.Tensor:
        """latents [B, D, T] -> codes [B, T, n]."""
        b, d, t = latents.shape
        residual = latents.transpose(1, 2).reshape(b * t, d)
        codes = []
        for book in self.layers[:n]:
            idx = book.nearest(residual)
            residual = residual - F.embedding(idx, book.embed)
            codes.append(idx)
        return torch.stack(codes, dim=-1).view(b, t, n)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, n] -> latents [B, D, T] (sum of the selected entries)."""
        out = F.embedding(codes[..., 0], self.layers[0].embed)
        for i in range(1, codes.shape[-1]):
            out = out + F.embedding(codes[..., i], self.layers[i].embed)
        return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------- codec


class EncodecCodec(ConfigCodecProperties, nn.Module):
    """EnCodec 24 kHz as an :class:`~dia_fast.codec.base.AudioCodec` with ``config.n_codebooks`` (9) codebooks.

    ``encode`` maps float PCM at 24 kHz ([N], [B, N] or [B, 1, N]) to int64 codes [B, T, 9] with
    T = ceil(N / 320); ``decode`` maps codes [B, T, 9] (or [T, 9]) to float32 PCM [B, T * 320].
    """

    def __init__(self, config: EncodecCodecConfig | None = None) -> None:
        super().__init__()
        self.config = config or EncodecCodecConfig()
        self.encoder = _Encoder(self.config)
        self.decoder = _Decoder(self.config)
        self.quantizer = _ResidualVQ(self.config)

    def _param(self) -> torch.Tensor:
        return self.quantizer.layers[0].embed

    # -- encode / decode
    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Float PCM at ``sample_rate``, [N] / [B, N] / [B, 1, N] -> int64 codes [B, ceil(N / hop), n_codebooks]."""
        wav = as_mono_batch(wav)
        ref = self._param()
        latents = self.encoder(wav.to(device=ref.device, dtype=ref.dtype))
        return self.quantizer.encode(latents, self.n_codebooks)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Int codes [B, T, n_codebooks] (or [T, n_codebooks]) -> float32 PCM [B, T * hop_length]."""
        device = self._param().device
        codes = check_codes(codes, self, device)
        if codes.numel() == 0:  # no frames: no samples, as DacCodec.decode
            return torch.zeros(codes.shape[0], 0, device=device)
        audio = self.decoder(self.quantizer.decode(codes))
        return audio[:, 0].float()

    # -- construction
    @classmethod
    def random(cls, preset: str = "tiny", seed: int = 0) -> EncodecCodec:
        """A codec with seeded random weights (tests, demos): the audio it makes is not speech."""
        codec = cls(EncodecCodecConfig.preset(preset))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in codec.named_parameters():
                if name.endswith("conv.weight"):
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))
                elif name.endswith("conv.bias"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
                else:  # LSTM: uniform +-1/sqrt(hidden), like PyTorch's default
                    bound = 1 / math.sqrt(p.shape[-1] if p.dim() > 1 else p.shape[0] // 4)
                    p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            # Codebooks on the scale of the latents they quantize, each finer than the last.
            probe = torch.randn(1, 1, 8 * codec.hop_length, generator=gen) * 0.1
            scale = codec.encoder(probe).std().item()
            for i, book in enumerate(codec.quantizer.layers):
                book.embed.copy_(torch.randn(book.embed.shape, generator=gen) * scale * 0.7**i)
        return codec.eval()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, config: EncodecCodecConfig | None = None, *, bandwidth: float | None = None
    ) -> EncodecCodec:
        """Load a checkpoint: a transformers ``save_pretrained`` directory, its ``.safetensors`` file
        or a hub id (fetched with ``huggingface_hub``); or an ``encodec`` package state dict
        (``encodec_24khz-d7cc33bc.th``, or a directory holding one). The config comes from ``config``,
        else a ``config.json`` beside the weights, else the 24 kHz preset. ``bandwidth`` overrides the
        config's (6.75 kbps = 9 codebooks). Raises :class:`~dia_fast.checkpoint.CheckpointError` naming
        missing, unexpected and mis-shaped keys."""
        path = resolve_path(path)  # a local path, or a hub id such as facebook/encodec_24khz
        weights = _find_weights(path) if path.is_dir() else path
        if config is None:
            config = EncodecCodecConfig()
            cfg_file = weights.parent / "config.json"
            if cfg_file.exists():
                cfg = json.loads(cfg_file.read_text())
                # A config.json of something else (e.g. a Dia checkpoint holding the .th) is not ours.
                if cfg.get("model_type") == "encodec":
                    config = EncodecCodecConfig.from_dict(cfg)
        if bandwidth is not None:
            config = replace(config, bandwidth=bandwidth)
        with torch.device("meta"):  # no point initialising weights that are about to be replaced
            codec = cls(config)
        state = to_internal(read_tensors(weights))
        expected = {k: v.shape for k, v in codec.state_dict().items()}
        check_state_dict(expected, state, str(weights))
        codec.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, assign=True)
        codec.random_weights = weights.suffix == ".safetensors" and has_random_weights(weights)
        return codec.eval()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` in transformers' ``EncodecModel`` layout. A random codec
        (``random_weights``: the demo codec) is marked so in the safetensors metadata, as the model's random weights
        are (:data:`~dia_fast.checkpoint.RANDOM_WEIGHTS_KEY`)."""
        from safetensors.torch import save_file

        out = Path(directory).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        save_file(to_transformers(self.state_dict()), str(out / "model.safetensors"), random_weights_metadata(self))
        return out


# ---------------------------------------------------------------------------------------------- layouts

_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")

# encodec package -> transformers names (SConv1d.conv(NormConv1d).conv(Conv1d), SConvTranspose1d.convtr.convtr).
_PACKAGE_RENAMES = (
    (re.compile(r"^(encoder|decoder)\.model\."), r"\1.layers."),
    (re.compile(r"\.conv\.conv\."), ".conv."),
    (re.compile(r"\.convtr\.convtr\."), ".conv."),
    (re.compile(r"^quantizer\.vq\.layers\.(\d+)\._codebook\."), r"quantizer.layers.\1.codebook."),
)


def _find_weights(directory: Path) -> Path:
    for name in _WEIGHT_NAMES:
        if (directory / name).exists():
            return directory / name
    found = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.th")) + sorted(directory.glob("*.pt"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(f"{directory}: no EnCodec weights (model.safetensors or an encodec *.th state dict)")
    raise CheckpointError(f"{directory}: several weight files, pass one: {[p.name for p in found]}")


def to_internal(state: Tensors) -> Tensors:
    """Either checkpoint layout -> this module's state dict (weight norm folded, training buffers dropped)."""
    if any(k.startswith(("encoder.model.", "quantizer.vq.")) for k in state):
        renamed: Tensors = {}
        for key, value in state.items():
            for pattern, repl in _PACKAGE_RENAMES:
                key = pattern.sub(repl, key)
            renamed[key] = value
        state = renamed
    state = fold_weight_norms(state, "EnCodec checkpoint")
    out: Tensors = {}
    for key, value in state.items():
        m = re.match(r"^quantizer\.layers\.(\d+)\.codebook\.(\w+)$", key)
        if m and m.group(2) in _TRAINING_BUFFERS:
            continue
        out[f"quantizer.layers.{m.group(1)}.{m.group(2)}" if m else key] = value
    return out


def to_transformers(state: Tensors) -> Tensors:
    """This module's state dict -> transformers' ``EncodecModel`` keys (weight-norm parametrized)."""
    out: Tensors = {}
    for key, value in state.items():
        value = value.detach().float().cpu().contiguous()
        if key.endswith("conv.weight"):
            base = key[: -len("weight")]
            g, v = unfold_weight_norm(value)
            out[base + "parametrizations.weight.original0"] = g
            out[base + "parametrizations.weight.original1"] = v
        elif m := re.match(r"^quantizer\.layers\.(\d+)\.embed$", key):
            prefix = f"quantizer.layers.{m.group(1)}.codebook."
            out[prefix + "embed"] = value
            out[prefix + "embed_avg"] = value.clone()
            out[prefix + "cluster_size"] = torch.zeros(value.shape[0])
            out[prefix + "inited"] = torch.ones(1)
        else:
            out[key] = value
    return out

"""Configuration dataclasses for Dia models; defaults are Dia-1.6B.

``DiaConfig.from_dict`` / ``from_json`` read the three ``config.json`` formats in use:
the official nari-labs format of Dia-1.6B (``"version": "0.1"``, ``model``/``data`` blocks),
the current official format of Dia-1.6B-0626 and transformers' ``DiaConfig`` (both with
``encoder_config``/``decoder_config``). ``to_dict`` writes the transformers format, plus a ``"dia_fast"`` block
for what that format cannot say (the v0.1 models' cross-attention RoPE); ``to_official_v01_dict`` writes the v0.1
format.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# The block of a transformers-layout config.json with what that layout cannot say (DiaConfig.to_dict)
DIA_FAST_KEY = "dia_fast"


class ConfigError(ValueError):
    """A config that cannot describe a working Dia model."""


@dataclass(frozen=True)
class EncoderConfig:
    """Text encoder: byte embeddings -> ``n_layer`` pre-norm transformer layers."""

    n_layer: int = 12
    hidden_size: int = 1024
    intermediate_size: int = 4096
    n_head: int = 16
    n_kv_head: int = 16
    head_dim: int = 128
    vocab_size: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class DecoderConfig:
    """Audio decoder: 9 summed code embeddings -> layers (self-attn, cross-attn, MLP) -> logits."""

    n_layer: int = 18
    hidden_size: int = 2048
    intermediate_size: int = 8192
    n_head: int = 16
    n_kv_head: int = 4
    head_dim: int = 128
    cross_n_head: int = 16
    cross_n_kv_head: int = 16
    cross_head_dim: int = 128
    vocab_size: int = 1028
    norm_eps: float = 1e-5
    # also the cross-attention RoPE's of v0.1 models (their config has one theta)
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Old (v0.1) checkpoints apply RoPE in cross-attention too; current ones do not.
    cross_attention_rope: bool = False


@dataclass(frozen=True)
class DataConfig:
    channels: int = 9
    text_length: int = 1024
    audio_length: int = 3072
    delay_pattern: tuple[int, ...] = (0, 8, 9, 10, 11, 12, 13, 14, 15)
    text_pad_value: int = 0
    audio_eos_value: int = 1024
    audio_pad_value: int = 1025
    audio_bos_value: int = 1026

    @property
    def max_delay(self) -> int:
        return max(self.delay_pattern) if self.delay_pattern else 0


@dataclass(frozen=True)
class DiaConfig:
    """A whole Dia model: architecture (``model``) and token/sequence layout (``data``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistency."""
        enc, dec, data = self.model.encoder, self.model.decoder, self.data
        if len(data.delay_pattern) != data.channels:
            raise ConfigError(
                f"delay_pattern has {len(data.delay_pattern)} entries but data.channels is {data.channels}"
            )
        if any(d < 0 for d in data.delay_pattern):
            raise ConfigError(f"delay_pattern must be non-negative, got {list(data.delay_pattern)}")
        if data.channels < 1:
            raise ConfigError(f"data.channels must be positive, got {data.channels}")
        sizes = ("n_layer", "hidden_size", "intermediate_size", "n_head", "n_kv_head", "head_dim")
        cross_sizes = ("cross_n_head", "cross_n_kv_head", "cross_head_dim")
        for name, sub, fields in (("encoder", enc, sizes), ("decoder", dec, sizes + cross_sizes)):
            for f in fields:
                if getattr(sub, f) <= 0:
                    raise ConfigError(f"model.{name}.{f} must be positive, got {getattr(sub, f)}")
            if sub.n_head % sub.n_kv_head:
                raise ConfigError(
                    f"model.{name}: n_head ({sub.n_head}) must be a multiple of n_kv_head ({sub.n_kv_head})"
                )
            if sub.head_dim % 2:
                raise ConfigError(f"model.{name}.head_dim must be even for RoPE, got {sub.head_dim}")
            if not (math.isfinite(sub.norm_eps) and sub.norm_eps >= 0):
                raise ConfigError(f"model.{name}.norm_eps must be finite and non-negative, got {sub.norm_eps}")
            if not (math.isfinite(sub.rope_theta) and sub.rope_theta > 0):
                raise ConfigError(f"model.{name}.rope_theta must be finite and positive, got {sub.rope_theta}")
        if self.model.cross_attention_rope and dec.cross_head_dim % 2:
            raise ConfigError(f"model.decoder.cross_head_dim must be even for RoPE, got {dec.cross_head_dim}")
        if dec.cross_n_head % dec.cross_n_kv_head:
            raise ConfigError(
                f"model.decoder: cross_n_head ({dec.cross_n_head}) must be a multiple of "
                f"cross_n_kv_head ({dec.cross_n_kv_head})"
            )
        specials = (data.audio_eos_value, data.audio_pad_value, data.audio_bos_value)
        if max(specials) >= dec.vocab_size:
            raise ConfigError(f"decoder vocab_size {dec.vocab_size} is too small for EOS/PAD/BOS {specials}")
        if len(set(specials)) != 3:
            raise ConfigError(f"EOS/PAD/BOS values must differ, got {specials}")
        if enc.vocab_size < 3:
            raise ConfigError(f"encoder vocab_size must hold pad, [S1] and [S2], got {enc.vocab_size}")
        if data.text_length <= 0 or data.audio_length <= data.max_delay + 1:
            raise ConfigError(
                f"text_length ({data.text_length}) must be positive and audio_length ({data.audio_length}) "
                f"larger than max delay + 1 ({data.max_delay + 1})"
            )

    @property
    def codebook_size(self) -> int:
        """Number of real audio codes per channel (ids below EOS)."""
        return self.data.audio_eos_value

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> DiaConfig:
        """``"dia-1.6b"`` (the released architecture) or ``"tiny"`` (tests and the demo)."""
        key = name.lower().replace("_", "-")
        if key in ("dia-1.6b", "dia", "1.6b", "dia-1.6b-0626"):
            return cls()
        if key == "tiny":
            return cls(
                model=ModelConfig(
                    encoder=EncoderConfig(
                        n_layer=2, hidden_size=64, intermediate_size=128, n_head=4, n_kv_head=4, head_dim=16
                    ),
                    decoder=DecoderConfig(
                        n_layer=2,
                        hidden_size=64,
                        intermediate_size=128,
                        n_head=4,
                        n_kv_head=2,
                        head_dim=16,
                        cross_n_head=4,
                        cross_n_kv_head=4,
                        cross_head_dim=16,
                    ),
                ),
                data=DataConfig(text_length=1024, audio_length=3072),
            )
        raise ConfigError(f"unknown preset {name!r}; expected 'tiny' or 'dia-1.6b'")

    def with_layers(self, encoder_layers: int, decoder_layers: int) -> DiaConfig:
        """The same widths with fewer (or more) layers (tests use full widths, few layers)."""
        return replace(
            self,
            model=replace(
                self.model,
                encoder=replace(self.model.encoder, n_layer=encoder_layers),
                decoder=replace(self.model.decoder, n_layer=decoder_layers),
            ),
        )

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_json(cls, path: str | Path) -> DiaConfig:
        """Read any supported ``config.json``."""
        try:
            raw = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        try:
            return cls.from_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DiaConfig:
        """Parse an official (v0.1 or current) or transformers config dict."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        if "model" in raw and isinstance(raw["model"], dict) and "encoder" in raw["model"]:
            return _from_official_v01(raw)
        if "encoder_config" in raw and "decoder_config" in raw:
            return _from_hf(raw)
        raise ConfigError(
            "unrecognised config format: expected the official v0.1 layout ('model'/'data') or the "
            "transformers/current layout ('encoder_config'/'decoder_config')"
        )

    def to_dict(self) -> dict[str, Any]:
        """The transformers ``DiaConfig`` layout (what ``save_pretrained`` writes). A model with cross-attention
        RoPE (v0.1) also gets ``"dia_fast": {"cross_attention_rope": true}``, which :meth:`from_dict` reads back;
        transformers keeps the key but its Dia has no cross-attention RoPE (it would run another model)."""
        enc, dec, data = self.model.encoder, self.model.decoder, self.data
        out: dict[str, Any] = {
            "architectures": ["DiaForConditionalGeneration"],
            "model_type": "dia",
            "is_encoder_decoder": True,
            "norm_eps": dec.norm_eps,  # (unused by transformers: each sub-config has its own)
            "delay_pattern": list(data.delay_pattern),
            "bos_token_id": data.audio_bos_value,
            "eos_token_id": data.audio_eos_value,
            "pad_token_id": data.audio_pad_value,
            "encoder_config": {
                "model_type": "dia_encoder",
                "num_hidden_layers": enc.n_layer,
                "hidden_size": enc.hidden_size,
                "intermediate_size": enc.intermediate_size,
                "num_attention_heads": enc.n_head,
                "num_key_value_heads": enc.n_kv_head,
                "head_dim": enc.head_dim,
                "vocab_size": enc.vocab_size,
                "max_position_embeddings": data.text_length,
                "norm_eps": enc.norm_eps,
                "hidden_act": "silu",
                "rope_parameters": {"rope_theta": enc.rope_theta, "rope_type": "default"},
            },
            "decoder_config": {
                "model_type": "dia_decoder",
                "num_hidden_layers": dec.n_layer,
                "hidden_size": dec.hidden_size,
                "intermediate_size": dec.intermediate_size,
                "num_attention_heads": dec.n_head,
                "num_key_value_heads": dec.n_kv_head,
                "head_dim": dec.head_dim,
                "cross_num_attention_heads": dec.cross_n_head,
                "cross_num_key_value_heads": dec.cross_n_kv_head,
                "cross_head_dim": dec.cross_head_dim,
                "cross_hidden_size": enc.hidden_size,
                "vocab_size": dec.vocab_size,
                "num_channels": data.channels,
                "max_position_embeddings": data.audio_length,
                "norm_eps": dec.norm_eps,
                "hidden_act": "silu",
                "rope_parameters": {"rope_theta": dec.rope_theta, "rope_type": "default"},
                "pad_token_id": data.audio_pad_value,
                "eos_token_id": data.audio_eos_value,
                "bos_token_id": data.audio_bos_value,
            },
        }
        if self.model.cross_attention_rope:
            out[DIA_FAST_KEY] = {"cross_attention_rope": True}
        return out

    def to_official_v01_dict(self) -> dict[str, Any]:
        """The official v0.1 ``config.json`` (Dia-1.6B's format, which implies cross-attention RoPE): what
        ``save_pretrained(layout="official")`` writes for a model with cross-attention RoPE. :class:`ConfigError`
        for a config that format cannot hold (it has one norm eps and one RoPE theta, no key/value head counts for the
        encoder and the cross-attention, and lengths in multiples of 128)."""
        enc, dec, data = self.model.encoder, self.model.decoder, self.data
        problems = []
        if not self.model.cross_attention_rope:
            problems.append("no cross-attention RoPE (the v0.1 code always applies it)")
        if enc.n_kv_head != enc.n_head:
            problems.append(f"encoder n_kv_head {enc.n_kv_head} != n_head {enc.n_head}")
        if dec.cross_n_kv_head != dec.cross_n_head:
            problems.append(f"decoder cross_n_kv_head {dec.cross_n_kv_head} != cross_n_head {dec.cross_n_head}")
        if enc.norm_eps != dec.norm_eps or enc.rope_theta != dec.rope_theta:
            problems.append("different encoder and decoder norm_eps / rope_theta")
        if data.text_length % 128 or data.audio_length % 128:
            problems.append(f"text/audio lengths {data.text_length}/{data.audio_length} not multiples of 128")
        if problems:
            raise ConfigError(f"the official v0.1 config format cannot hold this config: {'; '.join(problems)}")
        return {
            "version": "0.1",
            "model": {
                "encoder": {
                    "n_layer": enc.n_layer,
                    "n_embd": enc.hidden_size,
                    "n_hidden": enc.intermediate_size,
                    "n_head": enc.n_head,
                    "head_dim": enc.head_dim,
                },
                "decoder": {
                    "n_layer": dec.n_layer,
                    "n_embd": dec.hidden_size,
                    "n_hidden": dec.intermediate_size,
                    "gqa_query_heads": dec.n_head,
                    "kv_heads": dec.n_kv_head,
                    "gqa_head_dim": dec.head_dim,
                    "cross_query_heads": dec.cross_n_head,
                    "cross_head_dim": dec.cross_head_dim,
                },
                "src_vocab_size": enc.vocab_size,
                "tgt_vocab_size": dec.vocab_size,
                "dropout": 0.0,
                "normalization_layer_epsilon": dec.norm_eps,
                "weight_dtype": "float32",
                "rope_min_timescale": 1,
                "rope_max_timescale": int(dec.rope_theta) if float(dec.rope_theta).is_integer() else dec.rope_theta,
            },
            "training": {},
            "data": {
                "text_length": data.text_length,
                "audio_length": data.audio_length,
                "channels": data.channels,
                "text_pad_value": data.text_pad_value,
                "audio_eos_value": data.audio_eos_value,
                "audio_pad_value": data.audio_pad_value,
                "audio_bos_value": data.audio_bos_value,
                "delay_pattern": list(data.delay_pattern),
            },
        }

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def _get(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"config is missing '{where}{key}'")
    return d[key]


def _rope_theta(sub: dict[str, Any], where: str) -> float:
    """The RoPE theta of a transformers / current official sub-config (``rope_parameters``, the older
    ``rope_scaling`` dict, or a plain ``rope_theta``, in transformers' order). Only plain RoPE is supported: another
    ``rope_type`` is a :class:`ConfigError` (the model would differ silently). A ``partial_rotary_factor`` is ignored,
    as transformers' Dia ignores it (its rotary tables span the whole head)."""
    params = sub.get("rope_scaling") or sub.get("rope_parameters") or {}  # transformers prefers rope_scaling
    if not isinstance(params, dict):
        raise ConfigError(f"{where}rope_parameters / rope_scaling must be an object, got {params!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{where}rope_type={rope_type!r} is not supported (Dia uses plain RoPE, 'default')")
    theta = params.get("rope_theta", sub.get("rope_theta", 10000.0))
    return float(10000.0 if theta is None else theta)


def _dia_fast_block(raw: dict[str, Any]) -> bool:
    """``cross_attention_rope`` of the ``"dia_fast"`` block that :meth:`DiaConfig.to_dict` writes (False without)."""
    block = raw.get(DIA_FAST_KEY) or {}
    value = block.get("cross_attention_rope", False) if isinstance(block, dict) else None
    if not isinstance(value, bool):
        raise ConfigError(f"'{DIA_FAST_KEY}' must be an object with a boolean cross_attention_rope, got {block!r}")
    return value


def _check_act(sub: dict[str, Any], where: str) -> None:
    act = sub.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{where}hidden_act={act!r} is not supported (Dia uses 'silu')")


def _from_hf(raw: dict[str, Any]) -> DiaConfig:
    e, d = raw["encoder_config"], raw["decoder_config"]
    _check_act(e, "encoder_config.")
    _check_act(d, "decoder_config.")
    enc = EncoderConfig(
        n_layer=int(_get(e, "num_hidden_layers", "encoder_config.")),
        hidden_size=int(_get(e, "hidden_size", "encoder_config.")),
        intermediate_size=int(_get(e, "intermediate_size", "encoder_config.")),
        n_head=int(_get(e, "num_attention_heads", "encoder_config.")),
        n_kv_head=int(e.get("num_key_value_heads", e["num_attention_heads"])),
        head_dim=int(_get(e, "head_dim", "encoder_config.")),
        vocab_size=int(e.get("vocab_size", 256)),
        # each sub-config's own (transformers' layers read these; the top-level norm_eps is unused)
        norm_eps=float(e.get("norm_eps", 1e-5)),
        rope_theta=_rope_theta(e, "encoder_config."),
    )
    dec = DecoderConfig(
        n_layer=int(_get(d, "num_hidden_layers", "decoder_config.")),
        hidden_size=int(_get(d, "hidden_size", "decoder_config.")),
        intermediate_size=int(_get(d, "intermediate_size", "decoder_config.")),
        n_head=int(_get(d, "num_attention_heads", "decoder_config.")),
        n_kv_head=int(_get(d, "num_key_value_heads", "decoder_config.")),
        head_dim=int(_get(d, "head_dim", "decoder_config.")),
        cross_n_head=int(_get(d, "cross_num_attention_heads", "decoder_config.")),
        cross_n_kv_head=int(d.get("cross_num_key_value_heads", d["cross_num_attention_heads"])),
        cross_head_dim=int(_get(d, "cross_head_dim", "decoder_config.")),
        vocab_size=int(d.get("vocab_size", 1028)),
        norm_eps=float(d.get("norm_eps", 1e-5)),
        rope_theta=_rope_theta(d, "decoder_config."),
    )

    def special(name: str, default: int) -> int:
        value = raw.get(name)
        if value is None:
            value = d.get(name)
        if isinstance(value, list):
            value = value[0]
        return int(default if value is None else value)

    delay = tuple(int(x) for x in raw.get("delay_pattern", DataConfig.delay_pattern))
    data = DataConfig(
        channels=int(d.get("num_channels", len(delay))),
        text_length=int(e.get("max_position_embeddings", 1024)),
        audio_length=int(d.get("max_position_embeddings", 3072)),
        delay_pattern=delay,
        audio_eos_value=special("eos_token_id", 1024),
        audio_pad_value=special("pad_token_id", 1025),
        audio_bos_value=special("bos_token_id", 1026),
    )
    model = ModelConfig(encoder=enc, decoder=dec, cross_attention_rope=_dia_fast_block(raw))
    return DiaConfig(model=model, data=data)


def _from_official_v01(raw: dict[str, Any]) -> DiaConfig:
    m = raw["model"]
    e, d = _get(m, "encoder", "model."), _get(m, "decoder", "model.")
    data_raw = raw.get("data", {})
    min_ts = float(m.get("rope_min_timescale", 1))
    if min_ts != 1:
        raise ConfigError(f"model.rope_min_timescale={min_ts} is not supported (Dia uses 1)")
    eps = float(m.get("normalization_layer_epsilon", 1e-5))  # one for both (and one theta)
    theta = float(m.get("rope_max_timescale", 10000))
    enc = EncoderConfig(
        n_layer=int(_get(e, "n_layer", "model.encoder.")),
        hidden_size=int(_get(e, "n_embd", "model.encoder.")),
        intermediate_size=int(_get(e, "n_hidden", "model.encoder.")),
        n_head=int(_get(e, "n_head", "model.encoder.")),
        n_kv_head=int(e["n_head"]),
        head_dim=int(_get(e, "head_dim", "model.encoder.")),
        vocab_size=int(m.get("src_vocab_size", 256)),
        norm_eps=eps,
        rope_theta=theta,
    )
    cross_heads = int(_get(d, "cross_query_heads", "model.decoder."))
    dec = DecoderConfig(
        n_layer=int(_get(d, "n_layer", "model.decoder.")),
        hidden_size=int(_get(d, "n_embd", "model.decoder.")),
        intermediate_size=int(_get(d, "n_hidden", "model.decoder.")),
        n_head=int(_get(d, "gqa_query_heads", "model.decoder.")),
        n_kv_head=int(_get(d, "kv_heads", "model.decoder.")),
        head_dim=int(_get(d, "gqa_head_dim", "model.decoder.")),
        cross_n_head=cross_heads,
        cross_n_kv_head=cross_heads,
        cross_head_dim=int(_get(d, "cross_head_dim", "model.decoder.")),
        vocab_size=int(m.get("tgt_vocab_size", 1028)),
        norm_eps=eps,
        rope_theta=theta,
    )

    def round128(x: int) -> int:  # the official validator rounds lengths up to a multiple of 128
        return (x + 127) // 128 * 128

    data = DataConfig(
        channels=int(data_raw.get("channels", 9)),
        text_length=round128(int(data_raw.get("text_length", 1024))),
        audio_length=round128(int(data_raw.get("audio_length", 3072))),
        delay_pattern=tuple(int(x) for x in data_raw.get("delay_pattern", DataConfig.delay_pattern)),
        text_pad_value=int(data_raw.get("text_pad_value", 0)),
        audio_eos_value=int(data_raw.get("audio_eos_value", 1024)),
        audio_pad_value=int(data_raw.get("audio_pad_value", 1025)),
        audio_bos_value=int(data_raw.get("audio_bos_value", 1026)),
    )
    model = ModelConfig(encoder=enc, decoder=dec, cross_attention_rope=True)
    return DiaConfig(model=model, data=data)

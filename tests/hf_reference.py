"""transformers' Dia built with random weights, as the reference for parity tests."""

from __future__ import annotations

import torch

from dia_fast.config import DiaConfig


def hf_dia(config: DiaConfig, seed: int = 0):
    """A transformers ``DiaForConditionalGeneration`` with the same shapes as ``config`` and seeded
    random weights (norm weights perturbed away from 1 so that they matter)."""
    from transformers import DiaConfig as HFDiaConfig
    from transformers import DiaForConditionalGeneration

    hf_cfg = HFDiaConfig(**config.to_dict())
    torch.manual_seed(seed)
    model = DiaForConditionalGeneration(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 2 and "embed" not in name:  # Linear (out, in): keep activations O(1)
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / p.shape[1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def hf_processor():
    """A DiaProcessor with a tiny random DAC (only its tokenizer / delay logic is used here)."""
    from transformers import DacConfig, DacModel, DiaFeatureExtractor, DiaProcessor, DiaTokenizer

    torch.manual_seed(0)
    dac = DacModel(DacConfig(encoder_hidden_size=8, decoder_hidden_size=32, sampling_rate=44100)).eval()
    return DiaProcessor(DiaFeatureExtractor(sampling_rate=44100, hop_length=512), DiaTokenizer(), dac)


class HFDacAdapter:
    """transformers' DacModel behind dia_fast's AudioCodec protocol, so both sides share one codec."""

    def __init__(self, dac) -> None:
        self.dac = dac
        self.sample_rate = 44100
        self.hop_length = 512
        self.n_codebooks = 9
        self.codebook_size = 1024
        self.frame_rate = self.sample_rate / self.hop_length

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        pad = (-wav.shape[-1]) % self.hop_length
        x = torch.nn.functional.pad(wav, (0, pad))[:, None]
        return self.dac.encode(x).audio_codes.transpose(1, 2)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.dac.decode(audio_codes=codes.transpose(1, 2)).audio_values

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
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def hf_processor():
    """A DiaProcessor with a tiny random DAC (only its tokenizer / delay logic is used here)."""
    from transformers import DacConfig, DacModel, DiaFeatureExtractor, DiaProcessor, DiaTokenizer

    torch.manual_seed(0)
    dac = DacModel(DacConfig(encoder_hidden_size=8, decoder_hidden_size=32, sampling_rate=44100)).eval()
    return DiaProcessor(DiaFeatureExtractor(sampling_rate=44100, hop_length=512), DiaTokenizer(), dac)

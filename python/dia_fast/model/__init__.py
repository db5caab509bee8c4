"""The Dia transformer as plain ``nn.Module``s."""

from .dia import Decoder, DecoderState, DiaModel, Encoder
from .layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding

__all__ = ["Attention", "Decoder", "DecoderState", "DiaModel", "Encoder", "GatedMLP", "RMSNorm", "RotaryEmbedding"]

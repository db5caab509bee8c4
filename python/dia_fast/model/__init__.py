"""The Dia transformer as plain ``nn.Module``s."""

from .dia import Decoder, DecoderState, DiaModel, Encoder, allocate_state, semaphores_for, text_lengths
from .layers import CrossAttention, GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention

__all__ = [
    "CrossAttention",
    "Decoder",
    "DecoderState",
    "DiaModel",
    "Encoder",
    "GatedMLP",
    "RMSNorm",
    "RotaryEmbedding",
    "SelfAttention",
    "allocate_state",
    "semaphores_for",
    "text_lengths",
]

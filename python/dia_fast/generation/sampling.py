"""Sampling settings and the per-step EOS / delay-pattern bookkeeping of Dia generation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops


@dataclass(frozen=True)
class SamplingConfig:
    """How the next codes are picked from the logits.

    ``cfg_scale``: classifier-free guidance, guided = cond + cfg_scale * (cond - uncond); 0 turns
    CFG off (no unconditional rows are run). ``cfg_filter_top_k``: keep the conditional logits at
    the top-k ids of the guided logits (None: no filter). ``do_sample=False`` (or temperature 0)
    is greedy.
    """

    cfg_scale: float = 3.0
    temperature: float = 1.2
    top_p: float = 0.95
    cfg_filter_top_k: int | None = 45
    do_sample: bool = True

    def __post_init__(self) -> None:
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cfg_filter_top_k is not None and self.cfg_filter_top_k < 1:
            raise ValueError(f"cfg_filter_top_k must be >= 1 (or None), got {self.cfg_filter_top_k}")

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale != 0

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def apply_eos_rules(
    codes: torch.Tensor,
    pos: torch.Tensor,
    eos_pos: torch.Tensor,
    delays: torch.Tensor,
    forced_eos_pos: torch.Tensor,
    eos_value: int,
    pad_value: int,
) -> torch.Tensor:
    """Dia's end-of-speech countdown, as tensor ops (no host sync).

    codes [B, C] sampled at position ``pos`` (0-d tensor); ``eos_pos`` [B] is updated in place: the
    position where channel 0 emitted EOS (-1 while speaking). Channel 0 emitting EOS, or ``pos``
    reaching ``forced_eos_pos``, starts the countdown; channel ``c`` is then forced to EOS exactly
    ``delays[c]`` steps after it, and to PAD after that. Returns the new codes.
    """
    started = (codes[:, 0] == eos_value) | (pos >= forced_eos_pos)
    eos_pos.copy_(torch.where((eos_pos < 0) & started, pos, eos_pos))
    active = (eos_pos >= 0)[:, None]
    since = (pos - eos_pos)[:, None]
    codes = torch.where(active & (since == delays[None, :]), torch.full_like(codes, eos_value), codes)
    return torch.where(active & (since > delays[None, :]), torch.full_like(codes, pad_value), codes)


def exponential_cfg_sample(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    sampling: SamplingConfig,
    eos_id: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`dia_fast.ops.reference.cfg_sample` without its host synchronisation: codes [B, C] int64.

    The draw is ``argmax(probs / E)`` with ``E ~ Exp(1)``, an exact categorical draw (the trick
    ``torch.multinomial`` itself uses for one sample, so on the CPU the codes equal the reference's for
    the same generator state) but without ``multinomial``'s ``.item()`` validity check, so it can be
    captured in a CUDA graph.
    """
    logits = ops.filter_cfg_logits(
        cond, uncond, cfg_scale=sampling.cfg_scale, top_k=sampling.cfg_filter_top_k, eos_id=eos_id
    )
    if sampling.greedy:
        return logits.argmax(dim=-1)
    probs = ops.top_p_filter(logits / sampling.temperature, sampling.top_p).softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def sample_codes(
    logits: torch.Tensor,
    batch: int,
    sampling: SamplingConfig,
    eos_id: int,
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Next codes [B, C] from step logits [R, C, V] (R = 2B with CFG: conditional rows first).

    ``backend``: the ``cfg_sample`` backend (default: the device's); ``"torch"`` runs
    :func:`exponential_cfg_sample`, which is graph-safe, the others go through :func:`dia_fast.ops.cfg_sample`
    (the Triton kernel draws on the device and is graph-safe too).
    """
    cond = logits[:batch]
    uncond = logits[batch:] if sampling.use_cfg else cond
    if backend is None:
        backend = ops.select_backend("cfg_sample", logits.device)
    if backend == "torch":
        return exponential_cfg_sample(cond, uncond, sampling, eos_id, generator)
    return ops.cfg_sample(
        cond,
        uncond,
        cfg_scale=sampling.cfg_scale,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.cfg_filter_top_k,
        eos_id=eos_id,
        do_sample=not sampling.greedy,
        generator=generator,
        backend=backend,
    )

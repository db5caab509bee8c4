"""Quality of a quantized model against the full-precision model on the same weights (``--quantize``'s
``quality`` block; docs/quantization.md).

* Teacher-forced: the reference's greedy sequence (held to ``steps`` decoder steps) goes through both decoders
  in one pass; ``rel_logit_error`` = ||L_q - L_ref|| / ||L_ref|| over every position and channel (conditional
  row, no CFG), ``top1_agreement`` per channel = how often both argmaxes agree.
* Free-running: both generate greedily (CFG as ``generate`` does) for ``steps`` steps;
  ``greedy_code_agreement`` = equal codes / codes over the common length, and ``audio_snr_db`` compares the two
  decoded with the same codec: 10 log10(sum ref^2 / sum (ref - quant)^2).

With random weights this bounds the numerical error only: a random model's logits are nearly flat, so an
argmax flips at errors that a trained model would not notice. Speech quality needs released weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..text import encode_batch

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = ["precision_floor", "quantization_quality"]

TEXT = "[S1] Dia is an open weights text to dialogue model. [S2] You get full control over scripts and voices."


@torch.inference_mode()
def _teacher_forced_logits(tts: DiaTTS, delayed: torch.Tensor, text: str) -> torch.Tensor:
    model = tts.model
    data = tts.config.data
    ids, mask = encode_batch([text], data.text_length)
    ids, mask = ids.to(tts.device), mask.to(tts.device)
    state = model.new_state(model.encode(ids, mask), mask, delayed.shape[0])
    return model.decoder(delayed[None].to(tts.device), state)[0].float()  # [T, C, V]


def _logit_measures(l_ref: torch.Tensor, l_other: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(||L_other - L_ref|| / ||L_ref||, top-1 agreement per channel) of two [T, C, V] teacher-forced logits."""
    rel = float(torch.linalg.vector_norm(l_other - l_ref) / torch.linalg.vector_norm(l_ref).clamp_min(1e-30))
    return rel, (l_other.argmax(-1) == l_ref.argmax(-1)).float().mean(0)


def _check_steps(tts: DiaTTS, steps: int) -> int:
    """``tts``'s largest delay, after checking that ``steps`` leaves room for one frame past it."""
    md = tts.config.data.max_delay
    if steps < md + 2:
        raise ValueError(f"steps must be at least {md + 2}")
    return md


def _greedy(tts: DiaTTS, steps: int, text: str) -> Any:
    """``tts``'s greedy generation of ``text`` held to ``steps`` decoder steps (the sequence both models are fed)."""
    md = _check_steps(tts, steps)
    return tts.generate(text, max_new_tokens=steps, min_new_tokens=steps - md - 1, do_sample=False, progress=False)


def _delayed_codes(generation: Any, steps: int) -> torch.Tensor:
    """The delayed codes of a :func:`_greedy` generation, up to its last step (the teacher-forced input)."""
    delayed = generation.delayed[0]
    return delayed[: min(delayed.shape[0], int(generation.stats.get("steps", steps)) + 1)]


def quantization_quality(ref: DiaTTS, quant: DiaTTS, *, steps: int = 200, text: str = TEXT) -> dict[str, Any]:
    """Compare ``quant`` with ``ref`` (see the module doc); both must hold the same weights before quantization."""
    g_ref = _greedy(ref, steps, text)
    g_q = _greedy(quant, steps, text)
    delayed = _delayed_codes(g_ref, steps)
    l_ref = _teacher_forced_logits(ref, delayed, text)
    l_q = _teacher_forced_logits(quant, delayed, text)
    rel, top1 = _logit_measures(l_ref, l_q)
    c_ref, c_q = g_ref.codes[0], g_q.codes[0]
    n = min(c_ref.shape[0], c_q.shape[0])
    agree = float((c_ref[:n] == c_q[:n]).float().mean()) if n else float("nan")
    a_ref, a_q = g_ref.audio[0], g_q.audio[0]
    m = min(len(a_ref), len(a_q))
    noise = float(np.sum((a_ref[:m].astype(np.float64) - a_q[:m]) ** 2))
    signal = float(np.sum(a_ref[:m].astype(np.float64) ** 2))
    snr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    return {
        "teacher_forced_positions": int(delayed.shape[0]),
        "rel_logit_error": rel,
        "top1_agreement": [round(float(x), 4) for x in top1],
        "top1_agreement_mean": float(top1.mean()),
        "greedy_code_agreement": agree,
        "greedy_frames": [int(c_ref.shape[0]), int(c_q.shape[0])],
        "audio_snr_db": snr,
    }


def precision_floor(tts: DiaTTS, *, steps: int = 200, text: str = TEXT) -> dict[str, Any] | None:
    """The teacher-forced measures of :func:`quantization_quality` between ``tts`` (bf16 / fp16) and a float32 copy
    of the same weights: what the model's own precision alone does on these weights (``None`` for a float32 model).

    A quantized model's error at or above this floor is the random model's sensitivity, not the quantization's: a
    deep random model amplifies any rounding (at Dia-1.6B's 18 layers, bf16 against float32 gave a relative logit
    error of 1.08 on the CPU, docs/quantization.md)."""
    import copy

    from ..api import DiaTTS as _DiaTTS

    if tts.dtype == torch.float32:
        return None
    _check_steps(tts, steps)  # (before the float32 copy)
    fp32 = _DiaTTS(copy.deepcopy(tts.model).float(), tts.codec)
    delayed = _delayed_codes(_greedy(fp32, steps, text), steps)
    l_ref = _teacher_forced_logits(fp32, delayed, text)
    del fp32
    l_low = _teacher_forced_logits(tts, delayed, text)
    rel, top1 = _logit_measures(l_ref, l_low)
    return {
        "dtype": str(tts.dtype).removeprefix("torch."),
        "reference_dtype": "float32",
        "teacher_forced_positions": int(delayed.shape[0]),
        "rel_logit_error": rel,
        "top1_agreement": [round(float(x), 4) for x in top1],
        "top1_agreement_mean": float(top1.mean()),
    }

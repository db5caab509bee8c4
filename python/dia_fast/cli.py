"""``python -m dia_fast``: speak text (or clone a voice) into a WAV file.

Without ``--model`` a random-weight demo model runs (the audio is not speech): the command
shows that everything is installed and working. User errors (bad text, missing files, bad
options) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._version import __version__
from .cliparse import OneLineParser, given_options, warning_line
from .paths import real_path, unwritable_dir, unwritable_file


class UsageError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


def _nonempty(value: str) -> str:
    if not value.strip():
        raise argparse.ArgumentTypeError("empty value")
    return value


def _path(value: str) -> Path:
    """A path argument, ``~`` expanded (``--out=~/x.wav`` gets no shell expansion); an empty one is an error,
    not the current directory. Every path option goes through here; --model and --codec, which may also be
    names, are expanded by their loaders."""
    return Path(_nonempty(value)).expanduser()


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        error_prefix="dia_fast",
        prog="python -m dia_fast",
        description="Speak text with the Dia TTS model (or a random demo model) and write a WAV file.",
        epilog='Example: python -m dia_fast "[S1] Hello there. [S2] Hi!" --out hello.wav',
    )
    p.add_argument("text", nargs="?", help="text to speak, with [S1]/[S2] speaker tags; '-' reads stdin (UTF-8)")
    p.add_argument("--text-file", type=_path, help="read the text from this UTF-8 file")
    p.add_argument(
        "-o",
        "--out",
        type=_path,
        default=Path("out.wav"),
        help="output file; its extension picks the format: .wav .flac .ogg .opus .mp3 (default: out.wav)",
    )
    p.add_argument("--format", choices=("wav", "flac", "ogg", "opus", "mp3"), help="output format (default: by --out)")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        "--checkpoint",
        type=_nonempty,
        dest="model",
        help="checkpoint directory/file (official or transformers layout) or hub id",
    )
    g.add_argument(
        "--demo-preset",
        default="tiny",
        choices=("tiny", "dia-1.6b"),
        help="shapes of the random demo model used without --model (default: tiny)",
    )
    g.add_argument(
        "--codec",
        "--codec-checkpoint",
        type=_nonempty,
        dest="codec",
        help="'dac', 'encodec' or a codec checkpoint path (default: the model's DAC)",
    )
    g.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: the best available)")
    g.add_argument(
        "--threads", type=int, help="torch's CPU threads (default: 1 for small models like the demo, else one per core)"
    )
    g.add_argument("--dtype", help="float32, bfloat16, float16 (default: bf16 on CUDA, fp16 on MPS, fp32 on CPU)")
    g.add_argument(
        "--quantize",
        choices=("int8", "fp8", "int4"),
        help="quantize the decoder's weights (CPU: int8, int4; CUDA: int8, fp8, int4; see docs/quantization.md)",
    )
    g.add_argument(
        "--save-model",
        type=_path,
        metavar="DIR",
        help="save the loaded model to DIR (quantized with --quantize: loads back as it is); without text, only save "
        "(the options for speaking are then an error)",
    )
    g = p.add_argument_group("generation")
    g.add_argument(
        "--max-new-tokens",
        "--max-tokens",
        dest="max_new_tokens",
        type=int,
        help="decoder steps (~86 per second of audio); default: see README",
    )
    g.add_argument(
        "--min-new-tokens",
        type=int,
        help="no end of speech before this many decoder steps (default 0; the demo model: its whole length, per chunk)",
    )
    g.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (default 3.0)")
    g.add_argument("--temperature", type=float, default=1.2, help="sampling temperature (default 1.2)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    g.add_argument("--cfg-filter-top-k", type=int, default=45, help="CFG top-k filter (default 45)")
    g.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    g.add_argument("--seed", type=int, help="random seed for reproducible sampling")
    g = p.add_argument_group("voice cloning")
    g.add_argument("--prompt-wav", type=_path, help="audio of the voice to clone (WAV/FLAC/OGG, any rate)")
    g.add_argument("--prompt-text", help="transcript of --prompt-wav, with speaker tags, e.g. '[S1] ...'")
    g.add_argument("--speaker-file", type=_path, help="a voice saved with --save-speaker (instead of --prompt-wav)")
    g.add_argument("--save-speaker", type=_path, help="save the encoded --prompt-wav voice to this file for reuse")
    g = p.add_argument_group("output")
    g.add_argument("--loudness", type=float, default=-23.0, metavar="LUFS", help="target loudness (default -23)")
    g.add_argument("--no-loudness", action="store_true", help="leave the loudness as generated")
    g.add_argument("--sample-rate", type=int, help="resample the output to this rate (default: the codec's)")
    g.add_argument("--float", dest="float_wav", action="store_true", help="write 32-bit float WAV (default 16-bit)")
    g.add_argument("--crossfade-ms", type=float, default=40.0, help="crossfade between long-form chunks")
    g = p.add_argument_group("other")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    g.add_argument("--json", dest="json_out", action="store_true", help="print a JSON summary on stdout")
    g.add_argument("--info", action="store_true", help="print dia_fast.info() as JSON and exit")
    g.add_argument("--version", action="version", version=f"dia_fast {__version__}")
    return p


def _decode_text(data: bytes, source: str) -> str:
    """Text read from a file or stdin: UTF-8 (else a UsageError naming ``source`` and the byte), without the
    byte-order mark some editors write (it is not text to speak), line ends read as Python's text files read them."""
    bom = data.startswith(codecs.BOM_UTF8)
    try:
        text = data[len(codecs.BOM_UTF8) if bom else 0 :].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start + (len(codecs.BOM_UTF8) if bom else 0)
        raise UsageError(f"{source} is not UTF-8 text ({exc.reason} at byte {at})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(args: argparse.Namespace) -> str:
    if args.text_file is not None:
        if args.text is not None:
            raise UsageError("give the text either as an argument or with --text-file, not both")
        _raise_if(_unreadable_file("--text-file", args.text_file, "text file"))
        return _decode_text(args.text_file.read_bytes(), f"--text-file {args.text_file}")
    if args.text is None:
        raise UsageError('no text given: python -m dia_fast "[S1] Hello." --out hello.wav')
    if args.text == "-":  # the bytes, as --text-file reads them (not the locale's decoding of them)
        if sys.stdin is None:
            raise UsageError("text '-' reads stdin, but there is no stdin")
        stdin = getattr(sys.stdin, "buffer", None)
        return _decode_text(stdin.read(), "stdin") if stdin is not None else sys.stdin.read().removeprefix("\ufeff")
    return args.text


def _unreadable_file(flag: str, path: Path | None, what: str) -> str | None:
    """Why ``path`` cannot be read as a file, or None: it does not exist, or it is a directory. Anything else is
    read (a pipe, ``/dev/stdin``, a shell's ``<(...)``: not regular files, still readable)."""
    if path is None:
        return None
    if not path.exists():
        return f"{what} not found: {path}"
    if path.is_dir():
        return f"{flag} {path} is a directory, not a file"
    return None


def _check_args(args: argparse.Namespace) -> None:
    if args.prompt_text and not args.prompt_wav:
        raise UsageError(
            "--prompt-text needs --prompt-wav (the audio it transcribes; a --speaker-file holds its own transcript)"
        )
    if args.prompt_wav and args.speaker_file:
        raise UsageError("use either --prompt-wav or --speaker-file, not both")
    if args.save_speaker and not (args.prompt_wav and (args.prompt_text or "").strip()):
        raise UsageError("--save-speaker needs --prompt-wav and --prompt-text (the voice to save and its transcript)")
    _raise_if(_unreadable_file("--prompt-wav", args.prompt_wav, "prompt audio"))
    _raise_if(_unreadable_file("--speaker-file", args.speaker_file, "speaker file"))
    if args.sample_rate is not None and not 1000 <= args.sample_rate <= 384000:
        raise UsageError(f"--sample-rate must be between 1000 and 384000 Hz, got {args.sample_rate}")
    if not args.no_loudness and not -70.0 <= args.loudness <= 0.0:
        raise UsageError(f"--loudness must be between -70 and 0 LUFS, got {args.loudness}")
    if not math.isfinite(args.crossfade_ms) or args.crossfade_ms < 0:
        raise UsageError(f"--crossfade-ms must be a finite number >= 0, got {args.crossfade_ms}")
    # the output is checked before any work: format, directory, permission
    from .audio import AUDIO_FORMATS, MAX_RATES, audio_format_for

    out = args.out
    _raise_if(unwritable_file("--out", out, "out.wav"))
    try:
        fmt = audio_format_for(out, args.format)
    except ValueError as exc:
        raise UsageError(f"{exc} (or pass --format)") from None
    suffix = out.suffix.lstrip(".").lower()
    if args.format and suffix in AUDIO_FORMATS and suffix != fmt:
        _log(args, f"dia_fast: warning: writing {fmt} data into {out} (its extension says {suffix}; --format {fmt})")
    if args.float_wav and fmt != "wav":
        raise UsageError(f"--float writes WAV only; {out} is {fmt}")
    if args.sample_rate is not None and args.sample_rate > MAX_RATES.get(fmt, args.sample_rate):
        raise UsageError(f"--sample-rate {args.sample_rate}: {fmt} takes up to {MAX_RATES[fmt]} Hz")
    rates = AUDIO_FORMATS[fmt][2]
    if args.sample_rate is not None and rates is not None and args.sample_rate not in rates:
        raise UsageError(f"--sample-rate {args.sample_rate}: {fmt} takes {', '.join(map(str, rates))} Hz")
    if args.save_speaker is not None:
        _raise_if(unwritable_file("--save-speaker", args.save_speaker, "voice.safetensors"))
    _check_outputs_apart(args, speaking=True)
    _check_generation_options(args)


def _check_generation_options(args: argparse.Namespace) -> None:
    """The sampling and length options, before the model loads (the errors generate would give after it): the
    lengths against the model's delay pattern and audio length, read from the preset or the checkpoint's
    config.json (without a voice prompt, which only shortens the budget: generate checks the rest)."""
    from .checkpoint import local_config
    from .config import DiaConfig
    from .generation.generate import check_step_budget
    from .generation.sampling import SamplingConfig

    SamplingConfig(args.cfg_scale, args.temperature, args.top_p, args.cfg_filter_top_k, not args.greedy)
    config = DiaConfig.preset(args.demo_preset) if args.model is None else local_config(args.model)
    if config is None:  # a hub id, or a path the loader reports on
        return
    data, min_new = config.data, args.min_new_tokens
    most = data.audio_length - 1 - (data.max_delay + 1)  # the audio length less the BOS position and the delays
    if args.max_new_tokens is None and isinstance(min_new, int) and min_new > most:  # (not about max_new_tokens)
        raise UsageError(
            f"--min-new-tokens must be at most {most} (the model's audio length {data.audio_length} less the BOS "
            f"position and the delay pattern's {data.max_delay + 1} steps), got {min_new}"
        )
    check_step_budget(data, 0, args.max_new_tokens, 0 if min_new is None else min_new)


def _raise_if(problem: str | None) -> None:
    if problem is not None:
        raise UsageError(problem)


def _log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr)


def _load_tts(args: argparse.Namespace):
    from .api import DiaTTS

    if not args.model:
        _log(
            args,
            f"dia_fast: no --model given, using a random-weight '{args.demo_preset}' demo model: "
            "the audio shows the pipeline works but is not speech",
        )
    with warnings.catch_warnings(record=True) as caught:  # each shown as one clean line
        warnings.simplefilter("always")
        if args.model:
            tts = DiaTTS.from_pretrained(
                args.model, device=args.device, dtype=args.dtype, codec=args.codec, quantize=args.quantize
            )
        else:
            tts = DiaTTS.random(
                args.demo_preset, seed=0, device=args.device, dtype=args.dtype, codec=args.codec, quantize=args.quantize
            )
    for w in caught:
        _log(args, f"dia_fast: warning: {w.message}")
    return tts


def demo_max_new_tokens(text: str, frame_rate: float, max_delay: int, budget: int) -> int:
    """Decoder steps for a random demo model (which never decides to stop): the length a
    speaker would need for ``text`` at ~14 characters per second, plus one second."""
    seconds = len(text) / 14.0 + 1.0
    return int(min(budget, max(max_delay + 2, round(seconds * frame_rate) + max_delay + 1)))


def _voice(args: argparse.Namespace, tts) -> tuple[Any, str | None]:
    """(audio prompt codes or None, transcript or None) from --prompt-wav / --speaker-file. A transcript
    is tagged as a saved speaker's is (``[S1]`` when it has no tag), so saving the voice with
    --save-speaker and reusing it with --speaker-file speaks like --prompt-wav did."""
    from .voice import CustomSpeaker

    if args.speaker_file is not None:
        speaker = CustomSpeaker.load(args.speaker_file, pool=tts)
    elif args.prompt_wav is None:
        return None, None
    elif not (args.prompt_text or "").strip():  # run() warns: cloning without the transcript
        return tts.encode_prompt(args.prompt_wav), None
    else:
        speaker = CustomSpeaker.from_audio(args.prompt_wav, args.prompt_text, tts)
        if args.save_speaker is not None:
            speaker.save(args.save_speaker)
            _log(args, f"dia_fast: saved the voice to {args.save_speaker}")
    return speaker.codes, speaker.tagged_transcript(0)


def _check_save_model(args: argparse.Namespace) -> Path:
    """The --save-model directory, checked before anything loads: not a file, its parent there and writable, and
    not the --model checkpoint itself (saving there would overwrite the weights it was loaded from)."""
    out = args.save_model
    if out.exists() and not out.is_dir():
        raise UsageError(f"--save-model must be a directory, {out} is a file")
    _raise_if(unwritable_dir("--save-model", out if out.is_dir() else out.resolve().parent))
    return out


# what DiaTTS.save_pretrained writes in its directory
_SAVED_ENTRIES = ("config.json", "model.safetensors", "quantization.json", "dac", "codec")


def _check_outputs_apart(args: argparse.Namespace, speaking: bool) -> None:
    """No output overwrites an input or another output (checked before any work): ``--out``, ``--save-speaker``
    and what ``--save-model`` writes against ``--prompt-wav``, ``--speaker-file``, ``--text-file`` and the
    ``--model`` / ``--codec`` checkpoints."""

    real = real_path

    def within(a: Path, b: Path) -> bool:
        return a == b or b in a.parents

    named = {"--prompt-wav": args.prompt_wav, "--speaker-file": args.speaker_file, "--text-file": args.text_file,
             "--model": args.model, "--codec": args.codec}  # fmt: skip
    if isinstance(args.codec, str) and args.codec.lower() in ("dac", "encodec"):
        named["--codec"] = None  # a kind of random codec, not a path
    inputs = {flag: real(p) for flag, p in named.items() if p and Path(p).expanduser().exists()}
    files = {"--out": args.out if speaking else None, "--save-speaker": args.save_speaker}
    outputs = {flag: real(p) for flag, p in files.items() if p}
    for flag, path in outputs.items():
        for other, taken in outputs.items():
            if other < flag and path == taken:
                raise UsageError(f"{other} and {flag} are the same file: {path}")
        for source, src in inputs.items():
            if path == src or (src.is_dir() and path.exists() and within(path, src)):
                raise UsageError(f"{flag} {path} would overwrite the {source} input: give another file")
    if args.save_model is None:
        return
    out = real(args.save_model)
    written = [out / name for name in _SAVED_ENTRIES]
    for source, src in inputs.items():
        if src.is_dir() and out == src:
            raise UsageError(f"--save-model {out} is the {source} checkpoint: give another directory")
        if src.is_dir() and within(out, src):
            raise UsageError(f"--save-model {out} is inside the {source} checkpoint {src}: give another directory")
        if any(within(src, w) for w in written):
            raise UsageError(f"--save-model {out} would overwrite the {source} input {src}: give another directory")
    for flag, path in outputs.items():
        if any(within(path, w) for w in written):
            raise UsageError(f"{flag} {path} is where --save-model writes the model: give another file")


def _save_model(args: argparse.Namespace, tts, out: Path) -> dict[str, Any]:
    """Write the loaded model to ``out`` (``DiaTTS.save_pretrained``); the summary's part for it."""
    from .quantize import quantized_mode

    t0 = time.perf_counter()
    tts.save_pretrained(out)
    mode, save_s = quantized_mode(tts.model), time.perf_counter() - t0
    _log(args, f"dia_fast: saved the {mode or 'full-precision'} model to {out} ({save_s:.1f} s)")
    return {"saved_model": str(out), "quantize": mode, "save_s": round(save_s, 3)}


def _set_threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {args.threads}")
        cpus = os.cpu_count() or 1
        if args.threads > 4 * cpus:
            raise UsageError(f"--threads {args.threads} is more than 4x this machine's {cpus} CPUs")
        import torch

        torch.set_num_threads(args.threads)


# options that only speaking uses: an error in save-only mode (--save-model without text), where they would do
# nothing; the model options and --no-progress, --quiet, --json apply there too
_SPEAKING_OPTIONS = {
    "out": "--out",
    "format": "--format",
    "max_new_tokens": "--max-new-tokens",
    "min_new_tokens": "--min-new-tokens",
    "cfg_scale": "--cfg-scale",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "cfg_filter_top_k": "--cfg-filter-top-k",
    "greedy": "--greedy",
    "seed": "--seed",
    "prompt_wav": "--prompt-wav",
    "prompt_text": "--prompt-text",
    "speaker_file": "--speaker-file",
    "save_speaker": "--save-speaker",
    "loudness": "--loudness",
    "no_loudness": "--no-loudness",
    "sample_rate": "--sample-rate",
    "float_wav": "--float",
    "crossfade_ms": "--crossfade-ms",
}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Execute a parsed command line (``args.given``: the options it gives, see :func:`main`); returns the summary
    printed with ``--json``."""
    import numpy as np

    from . import audio

    save_to = _check_save_model(args) if args.save_model is not None else None
    if save_to is not None and args.text is None and args.text_file is None:  # only save the model
        given = [flag for dest, flag in _SPEAKING_OPTIONS.items() if dest in getattr(args, "given", ())]
        if given:
            needs = "needs" if len(given) == 1 else "need"
            raise UsageError(f"{', '.join(given)} {needs} text to speak (--save-model without text only saves)")
        _check_outputs_apart(args, speaking=False)
        _set_threads(args)
        tts = _load_tts(args)
        return {"demo_model": bool(tts.demo), "device": str(tts.device), **_save_model(args, tts, save_to)}
    text = _read_text(args)
    if not text.strip():
        raise UsageError("text is empty: give at least one character to speak")
    _check_args(args)
    _set_threads(args)
    t0 = time.perf_counter()
    tts = _load_tts(args)
    if args.threads is None:  # a small model runs on 1 thread: see default_cpu_threads
        from .devices import use_default_cpu_threads

        use_default_cpu_threads(tts.device, tts.config.model.decoder.hidden_size)
    load_s = time.perf_counter() - t0
    saved = {} if save_to is None else _save_model(args, tts, save_to)
    prompt, transcript = _voice(args, tts)
    if prompt is not None and not transcript:
        _log(args, "dia_fast: warning: no --prompt-text: cloning quality suffers without the prompt's transcript")

    from .longform import generate_long

    data = tts.config.data
    prompt_frames = 0 if prompt is None else int(prompt.shape[0])
    chunks = _chunks(tts, text, transcript, prompt_frames)

    def lengths(chunk: str) -> dict[str, int | None]:
        """Decoder steps for one generation: the options', else for the demo model the length of its text, held to
        it (a random model may stop at any step: so the audio follows the text)."""
        max_new, min_new = args.max_new_tokens, args.min_new_tokens
        if max_new is None and tts.demo:
            budget = data.audio_length - 1 - prompt_frames
            max_new = demo_max_new_tokens(chunk, tts.codec.frame_rate, data.max_delay, budget)
            if min_new is not None:  # room for --min-new-tokens after the delay pattern, however short the text
                max_new = min(budget, max(max_new, min_new + data.max_delay + 1))
        if min_new is None:
            min_new = max(max_new - data.max_delay - 1, 0) if tts.demo and max_new is not None else 0
        return {"max_new_tokens": max_new, "min_new_tokens": min_new}

    options = dict(
        cfg_scale=args.cfg_scale,
        temperature=args.temperature,
        top_p=args.top_p,
        cfg_filter_top_k=args.cfg_filter_top_k,
        do_sample=not args.greedy,
        seed=args.seed,
        progress=False if args.no_progress or args.quiet else None,
    )
    t1 = time.perf_counter()
    if len(chunks) > 1:
        _log(args, f"dia_fast: long text: speaking it in {len(chunks)} chunks (same voice, crossfaded)")
        with _quiet_transcript_warning():
            samples, rate = generate_long(
                tts,
                text,
                audio_prompt=prompt,
                audio_prompt_text=transcript,
                crossfade_ms=args.crossfade_ms,
                chunks=chunks,
                chunk_kwargs=lengths,  # each chunk its own demo length
                **options,
            )
        steps_per_s = None
    else:
        with _quiet_transcript_warning():
            result = tts.generate(text, audio_prompt=prompt, audio_prompt_text=transcript, **options, **lengths(text))
        samples, rate = result.audio[0], result.sample_rate
        steps_per_s = result.stats.get("steps_per_s")
        if result.truncated[0] and args.max_new_tokens is not None and not tts.demo:
            _log(
                args,
                f"dia_fast: warning: --max-new-tokens {args.max_new_tokens} ended the speech before the model did: "
                "the audio may stop mid-word (raise it, or leave it out)",
            )
    gen_s = time.perf_counter() - t1
    if samples.size == 0:
        raise RuntimeError("the model produced no audio (it ended right away); try another seed or --greedy")
    if args.sample_rate and args.sample_rate != rate:
        samples, rate = audio.resample(samples, rate, args.sample_rate), args.sample_rate
    if not args.no_loudness:
        samples = audio.normalize_loudness(samples, rate, args.loudness)
    out = audio.write_audio(
        args.out,
        np.asarray(samples, np.float32),
        rate,
        format=args.format,
        subtype="FLOAT" if args.float_wav else "PCM_16",
    )
    duration = samples.shape[0] / rate
    rate = audio.io.written_rate(rate, audio.audio_format_for(out, args.format))  # (Opus: 48 kHz for 44.1 kHz)
    summary = {
        "out": str(out),
        "seconds": round(duration, 3),
        "sample_rate": rate,
        "demo_model": bool(tts.demo),
        "device": str(tts.device),
        "dtype": str(tts.dtype).replace("torch.", ""),
        "load_s": round(load_s, 3),
        "generate_s": round(gen_s, 3),
        "realtime_factor": round(duration / gen_s, 3) if gen_s > 0 else None,
        "steps_per_s": round(steps_per_s, 1) if steps_per_s else None,
        **saved,
    }
    _log(args, f"dia_fast: wrote {out} ({duration:.2f} s at {rate} Hz, {duration / max(gen_s, 1e-9):.2f}x realtime)")
    return summary


def _chunks(tts, text: str, transcript: str | None, prompt_frames: int) -> list[str]:
    """``text`` in chunks that fit the model's budgets after the prompt (an explicit --max-new-tokens caps each
    chunk's audio, it does not split; a prompt too long for the text is a ValueError that says so)."""
    from .longform import chunk_budget, split_after_prompt, split_text

    def split(frames: int) -> list[str]:
        return split_text(text, *chunk_budget(tts, prompt_text=transcript, prompt_frames=frames))

    return split_after_prompt(tts, prompt_frames, split)


@contextmanager
def _quiet_transcript_warning() -> Iterator[None]:
    """The CLI already printed its own warning about a missing transcript."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="an audio prompt was given without its transcript")
        yield


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dia_fast`` and the ``dia-fast`` script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.given = given_options(parser, argv, args)
    if args.info:
        # it only prints: text or another option would be ignored, so it is an error (as in save-only mode)
        flags = {
            a.dest: next(o for o in a.option_strings if o.startswith("--")) for a in parser._actions if a.option_strings
        }
        ignored = (["the text"] if args.text is not None else []) + [
            flag for dest, flag in flags.items() if dest in args.given and dest != "info"
        ]
        if ignored:
            print(
                f"dia_fast: error: --info only prints; it takes no text and no other option: {', '.join(ignored)}",
                file=sys.stderr,
            )
            return 2
        from .info import info

        print(json.dumps(info(), indent=2, default=str))
        return 0
    from .checkpoint import CheckpointError
    from .config import ConfigError

    try:
        with warnings.catch_warnings():
            # doubtful text, short prompts, ...: one line each, once (none with --quiet)
            warnings.simplefilter("once", UserWarning)
            warnings.showwarning = lambda message, _category, filename, lineno, *_a, **_k: _log(
                args, warning_line("dia_fast", message, filename, lineno)
            )
            from .devices import keep_torch_threads

            with keep_torch_threads():
                summary = run(args)
    except (UsageError, ValueError, OSError, ConfigError, CheckpointError) as exc:
        print(f"dia_fast: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. the model produced no audio: not a usage error, still one line
        print(f"dia_fast: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dia_fast: interrupted", file=sys.stderr)
        return 130
    if args.json_out:
        print(json.dumps(summary))
    return 0

"""``python -m dia_fast.bench``: dia_fast against transformers' Dia on identical weights, in one process.

>>> from dia_fast.bench import BenchOptions, run_bench
>>> doc = run_bench(BenchOptions(model="tiny", device="cpu", batches=(1,), steps=64))
>>> doc["results"][0]["decode_steps_per_s"]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import ops
from .._version import __version__
from ..checkpoint import local_config
from ..cliparse import OneLineParser, given_options, warning_line
from ..codec import AudioCodec, load_codec
from ..config import DataConfig, DiaConfig
from ..devices import keep_torch_threads, resolve_device, resolve_dtype, use_default_cpu_threads
from ..generation.sampling import SamplingConfig
from ..info import _version_of
from ..paths import overwrites_input, unwritable_file
from .report import add_speedups, document, table, write_json
from .runners import (
    Case,
    DiaFastCase,
    RunResult,
    TransformersCase,
    build_transformers,
    free_engine_caches,
    time_to_first_audio,
)

if TYPE_CHECKING:
    from ..api import DiaTTS

__all__ = ["COMPARES", "BenchOptions", "default_compare", "main", "parse_args", "run_bench"]

TEXTS = [
    "[S1] Dia is an open weights text to dialogue model. [S2] You get full control over scripts and voices.",
    "[S1] Wow. Amazing. (laughs) [S2] Try it now on Git hub or Hugging Face.",
    "[S1] The quick brown fox jumps over the lazy dog. [S2] And then it runs away!",
    "[S1] How fast can this go? [S2] Let us measure it, on the same weights, in the same process.",
]
COMPARES = ("transformers", "transformers-compile", "eager", "transformers-bf16")
# transformers-compile spends minutes compiling off CUDA (and its CUDA graphs are CUDA-only): asked for there
_NO_DEFAULT_COMPILE = ("cpu", "mps")


def default_compare(device: torch.device | str) -> tuple[str, ...]:
    """The baselines run when ``--compare`` is not given: all of them on CUDA; on CPU and MPS all but
    ``transformers-compile``."""
    kind = torch.device(device).type
    return tuple(
        c
        for c in COMPARES
        if c != "transformers-bf16" and not (c == "transformers-compile" and kind in _NO_DEFAULT_COMPILE)
    )


def _check_compare(names: tuple[str, ...]) -> None:
    bad = [n for n in names if n not in COMPARES]
    if bad:
        raise ValueError(
            f"unknown --compare name(s) {', '.join(map(repr, bad))}; valid: {', '.join(COMPARES)} "
            "(comma-separated), or none"
        )


@dataclass
class BenchOptions:
    """Settings of one bench run (the command-line options, see ``python -m dia_fast.bench -h``)."""

    model: str = "tiny"
    device: str | None = None
    dtype: str | None = None
    batches: tuple[int, ...] = (1,)
    steps: int = 256
    compare: tuple[str, ...] | None = None  # None: default_compare(device)
    json_path: str | None = None
    layers: int | None = None
    codec: str = "auto"
    do_sample: bool = False
    repeat: int = 2
    chunk_frames: int = 43
    first_chunk_frames: int = 16
    seed: int = 0
    quiet: bool = False
    count_launches: bool = False
    load: bool = False  # the load benchmark instead (dia_fast.bench.load)
    requests: int = 16
    arrival_rate: float | None = None
    max_slots: int | None = None
    threads: int | None = None  # torch's CPU threads (None: its default)
    quantize: tuple[str, ...] = ()  # quantized copies of the model run as engines dia_fast-<mode>
    quality_steps: int = 200
    loading_memory: bool = True  # --quantize: measure the memory of loading the checkpoint per mode
    cuda_int8: tuple[str, ...] = ()  # --quantize on CUDA: the int8 kernels to run (empty: the library's default)


def _quant_variants(opts: BenchOptions, device: torch.device) -> list[tuple[str, str | None, str]]:
    """(mode, int8 kernel, engine label) per quantized engine: on CUDA the int8 and int4 modes run once per
    ``--cuda-int8`` kernel (labelled ``MODE-KERNEL`` when there are several)."""
    out: list[tuple[str, str | None, str]] = []
    for mode in opts.quantize:
        kernels = opts.cuda_int8 if device.type == "cuda" and mode in ("int8", "int4") else ()
        if not kernels:
            out.append((mode, None, mode))
        for kernel in kernels:
            out.append((mode, kernel, mode if len(kernels) == 1 else f"{mode}-{kernel}"))
    return out


def machine_load() -> dict[str, Any]:
    """The 1-minute load average, the CPU count, and whether the machine is busy (load above half its CPUs)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cpus = os.cpu_count() or 1
    return {"loadavg_1m": load, "cpus": cpus, "busy": load is not None and load > 0.5 * cpus}


def _log(opts: BenchOptions, t0: float) -> Callable[[str], None]:
    def log(msg: str) -> None:
        if not opts.quiet:
            print(f"[bench {time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def _codec(kind: str, seed: int, device: torch.device) -> tuple[AudioCodec, str]:
    """``tiny`` / ``44khz``: a random DAC of that size; anything else: a codec checkpoint path."""
    if kind in ("tiny", "44khz"):
        from ..codec.dac import DacCodec

        return DacCodec.random(kind, seed=seed).to(device), f"random DAC ({kind})"
    return load_codec(kind, device=device), f"checkpoint {kind}"


PRESET_NAMES = ("tiny", "dia-1.6b", "dia", "1.6b")  # --model values that build a preset with random weights


def is_preset(model: str) -> bool:
    """Whether ``--model`` names a preset (built with random weights): one of :data:`PRESET_NAMES` that is not an
    existing file or folder (an existing path always wins: ``--model tiny`` loads a checkpoint folder ./tiny)."""
    return model.lower() in PRESET_NAMES and not Path(model).expanduser().exists()


def model_data_config(model: str) -> DataConfig | None:
    """The data settings (audio length, delays) of ``--model``, read without building it: a preset's, or a local
    checkpoint's ``config.json``; None for a hub id or a config the build will report."""
    if is_preset(model):
        return DiaConfig.preset(model.lower()).data
    try:
        config = local_config(model)
    except (OSError, ValueError):  # ConfigError is a ValueError: the build reports it
        return None
    return None if config is None else config.data


def steps_problem(flag: str, steps: int, data: DataConfig) -> str | None:
    """Why ``flag`` (decode steps per call) does not fit the model, or None: at least the delay pattern's steps
    plus one, at most the audio length minus the BOS position."""
    low, high = data.max_delay + 2, data.audio_length - 1
    if steps < low:
        return f"{flag} must be at least {low} (the delay pattern needs {low - 1} steps to finish), got {steps}"
    if steps > high:
        return f"{flag} must be at most {high} (the model's audio length is {data.audio_length}), got {steps}"
    return None


def build_tts(opts: BenchOptions, log: Callable[[str], None]) -> tuple[DiaTTS, dict[str, Any]]:
    """The dia_fast model: a preset with seeded random weights (optionally fewer layers), or a checkpoint."""
    from ..api import DiaTTS

    device = resolve_device(opts.device)
    dtype = resolve_dtype(opts.dtype, device)
    key = opts.model.lower()
    if is_preset(opts.model):
        cfg = DiaConfig.preset(key)
        if opts.layers is not None:
            cfg = cfg.with_layers(opts.layers, opts.layers)
        # auto: the preset's own codec size, so that time to first audio pays the real decoder's cost
        kind = ("tiny" if key == "tiny" else "44khz") if opts.codec == "auto" else opts.codec
        codec, codec_desc = _codec(kind, opts.seed, device)
        log(f"building {opts.model} with random weights (seed {opts.seed}) on {device} in {dtype}")
        tts = DiaTTS.random(cfg, seed=opts.seed, device=device, dtype=dtype, codec=codec)
        source = f"preset {opts.model}, random weights (seed {opts.seed})"
    else:
        if opts.layers is not None:
            raise ValueError("--layers only applies to the presets (tiny, dia-1.6b), not to a checkpoint")
        codec = None
        codec_desc = "from the checkpoint directory (or a random demo DAC)"
        if opts.codec != "auto":
            codec, codec_desc = _codec(opts.codec, opts.seed, device)
        log(f"loading checkpoint {opts.model} on {device} in {dtype}")
        tts = DiaTTS.from_pretrained(opts.model, device=device, dtype=dtype, codec=codec)
        source = f"checkpoint {Path(opts.model).expanduser()}"
    enc, dec = tts.config.model.encoder, tts.config.model.decoder
    info = {
        "model": opts.model,
        "source": source,
        "encoder_layers": enc.n_layer,
        "decoder_layers": dec.n_layer,
        "decoder_hidden_size": dec.hidden_size,
        "parameters": sum(p.numel() for p in tts.model.parameters()),
        "codec": codec_desc,
        "codec_frame_rate": tts.codec.frame_rate,
    }
    return tts, info


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU (mps)"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


def _check_steps(opts: BenchOptions, data: DataConfig | None) -> None:
    """``--steps`` (and ``--quality-steps`` with ``--quantize``) against the model's delays and audio length."""
    if data is None:
        return
    for flag, steps in (("--steps", opts.steps), ("--quality-steps", opts.quality_steps if opts.quantize else None)):
        if steps is not None and (problem := steps_problem(flag, steps, data)):
            raise ValueError(problem)


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the bench and return its JSON document (also printed as a table and written to ``json_path``).
    torch's thread count is restored afterwards (``--threads`` and the small-model default apply to the run)."""
    with keep_torch_threads():
        return _run_bench(opts)


def _run_bench(opts: BenchOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    log = _log(opts, t0)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    busy = machine_load()
    if busy["busy"]:
        log(
            f"warning: the machine is busy (load average {busy['loadavg_1m']:.1f} on {busy['cpus']} CPUs): CPU "
            "timings will be noisy; compare the ratios within this run, or try --threads 1"
        )
    if opts.compare is not None:
        _check_compare(opts.compare)
    if not opts.batches or min(opts.batches) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {opts.batches}")
    _check_steps(opts, model_data_config(opts.model))  # before the build where the config is known without it
    tts, model_info = build_tts(opts, log)
    if opts.threads is None and (n := use_default_cpu_threads(tts.device, tts.config.model.decoder.hidden_size)):
        log(f"torch threads: {n} (a small model; --threads to choose)")
    device = tts.device
    _check_steps(opts, tts.config.data)
    if opts.cuda_int8 and device.type != "cuda":
        raise ValueError(f"--cuda-int8 chooses CUDA's int8 kernel; this run is on {device.type}")
    from ..quantize import check_quantize, quantized_mode

    for mode in opts.quantize:  # every mode (and int8 kernel) checked before any is measured
        for kernel in opts.cuda_int8 or (None,):
            check_quantize(mode, device, tts.dtype, kernel)
    if opts.load:
        return _run_load(opts, tts, model_info, log, t0)
    sampling = SamplingConfig(do_sample=opts.do_sample)
    notes: list[str] = []
    compare = list(default_compare(device) if opts.compare is None else opts.compare)
    if opts.compare is None and device.type in _NO_DEFAULT_COMPILE:
        notes.append(f"transformers-compile is not run by default on {device.type}: ask with --compare")
    if any(c.startswith("transformers") for c in compare) and importlib.util.find_spec("transformers") is None:
        notes.append("transformers is not installed: no transformers baselines")
        compare = [c for c in compare if not c.startswith("transformers")]
    if (saved_mode := quantized_mode(tts.model)) is not None:  # a saved quantized directory: no weights to share
        asked = [c for c in compare if c.startswith("transformers")] if opts.compare is not None else []
        if asked:
            raise ValueError(
                f"--model {opts.model} holds {saved_mode}-quantized weights, which {', '.join(asked)} cannot load: "
                f"bench its full-precision checkpoint with --quantize {saved_mode}, or --compare none / eager"
            )
        if any(c.startswith("transformers") for c in compare):
            notes.append(f"a {saved_mode}-quantized checkpoint: no transformers baselines (they need its weights)")
            compare = [c for c in compare if not c.startswith("transformers")]
        if opts.quantize:
            raise ValueError(f"--model {opts.model} is already {saved_mode}-quantized: --quantize needs full precision")
    from ..api import DiaTTS

    hf = hf_bf16 = None
    if any(c in ("transformers", "transformers-compile") for c in compare):
        log("building transformers' DiaForConditionalGeneration with the same weights")
        hf = build_transformers(tts)
    if "transformers-bf16" in compare:
        log("building transformers' DiaForConditionalGeneration with the same weights in bfloat16")
        hf_bf16 = build_transformers(DiaTTS(copy.deepcopy(tts.model).to(torch.bfloat16), tts.codec))
    quantized: dict[str, DiaTTS] = {}
    quant_meta: dict[str, Any] = {}
    for mode, int8_kernel, label in _quant_variants(opts, device):
        log(f"quantizing a copy of the model: {label}")
        from ..quantize import quantize_decoder

        qtts = DiaTTS(copy.deepcopy(tts.model), tts.codec)
        quant_meta[label] = quantize_decoder(qtts.model, mode, int8_kernel=int8_kernel)
        if int8_kernel is not None:
            quant_meta[label]["int8_kernel"] = int8_kernel
        quantized[label] = qtts
        log(f"quality of {label} against the full-precision model ({opts.quality_steps} steps, teacher-forced)")
        from .quality import quantization_quality

        quant_meta[label]["quality"] = quantization_quality(tts, qtts, steps=opts.quality_steps)
    quality_floor = None
    if quantized and tts.dtype != torch.float32:
        from .quality import precision_floor

        log(f"precision floor: the full-precision model in {tts.dtype} against a float32 copy (teacher-forced)")
        quality_floor = precision_floor(tts, steps=opts.quality_steps)
    if "eager" in compare and device.type not in ("cuda", "cpu"):
        notes.append(f"dia_fast-eager: step graphs exist on CUDA and the CPU, so on {device.type} it runs as dia_fast")

    channels, rate = tts.config.data.channels, tts.codec.frame_rate

    def make_cases(batch: int, steps: int) -> list[Case]:
        texts = [TEXTS[i % len(TEXTS)] for i in range(batch)]
        cases: list[Case] = [DiaFastCase(tts, texts, steps, sampling, graphs=None, engine="dia_fast")]
        if "eager" in compare:
            cases.append(DiaFastCase(tts, texts, steps, sampling, graphs=False, engine="dia_fast-eager"))
        for mode, qtts in quantized.items():
            cases.append(DiaFastCase(qtts, texts, steps, sampling, graphs=None, engine=f"dia_fast-{mode}"))
        if hf_bf16 is not None:
            cases.append(
                TransformersCase(
                    *hf_bf16, texts, steps, sampling, channels=channels, frame_rate=rate, engine="transformers-bf16"
                )
            )
        for name in ("transformers", "transformers-compile"):
            if hf is not None and name in compare:
                compiled = name == "transformers-compile"
                cases.append(
                    TransformersCase(*hf, texts, steps, sampling, channels=channels, frame_rate=rate, compiled=compiled)
                )
        return cases

    # One short untimed call of each engine (batch 1) before anything is measured: the one-time costs of a first
    # call (imports, lazy set-up, thread pools, library workspaces) then land in no batch size's warm-up, so that
    # peak_memory_bytes does not depend on the order of --batch. transformers-compile is left out: its warm-up is
    # where it compiles (warmup_s), and the eager transformers call has done the rest.
    log("one short untimed call per engine (first-call costs out of the measurements)")
    for case in make_cases(1, tts.config.data.max_delay + 2):
        if case.engine != "transformers-compile":
            case.prime()
    results: list[RunResult] = []
    for batch in opts.batches:
        texts = [TEXTS[i % len(TEXTS)] for i in range(batch)]
        for model in (tts.model, *(q.model for q in quantized.values())):
            free_engine_caches(model)
        cases = make_cases(batch, opts.steps)
        # transformers-compile last: its warm-up records CUDA graphs of its own (torch.compile's cudagraph trees),
        # and on an H200 a dia_fast graph captured before them and replayed after them faulted once (RESULTS.md)
        groups = [[c for c in cases if c.engine != "transformers-compile"]]
        groups += [[c for c in cases if c.engine == "transformers-compile"]]
        groups = [g for g in groups if g]  # (the first always holds dia_fast)
        ttfa = None
        for i, group in enumerate(groups):
            for case in group:
                log(f"{case.engine} batch {batch}: warm-up")
                case.warm_up()
            for r in range(opts.repeat):  # interleaved, so that load changes hit every engine alike
                log(f"batch {batch}: timed run {r + 1}/{opts.repeat} of {', '.join(c.engine for c in group)}")
                for case in group:
                    case.run()
            if i == 0 and batch == 1:  # (before transformers-compile too: it replays dia_fast's batch-1 graph)
                log("dia_fast batch 1: streaming, time to first audio")
                ttfa = time_to_first_audio(
                    tts,
                    texts[0],
                    opts.steps,
                    sampling,
                    chunk_frames=opts.chunk_frames,
                    first_chunk_frames=opts.first_chunk_frames,
                )
        rows = [case.result() for case in cases]
        rows[0].time_to_first_audio_s = ttfa
        results.extend(rows)
        add_speedups(results)
        if not opts.quiet:
            print(table(rows), flush=True)
        if opts.json_path:  # what is measured so far survives a later failure or time limit
            write_json(opts.json_path, document({"partial": True, "model": opts.model, "device": str(device)}, results))
    add_speedups(results)
    # after the timed runs (a stage stopped by its time limit keeps them): one process per mode
    loading = _loading_memory(opts, tts, log) if opts.quantize and opts.loading_memory else None
    launches: dict[str, Any] = {}
    if opts.count_launches:
        from .launches import count_decode_launches

        for batch in opts.batches:
            log(f"counting the launches of an eager decode step, batch {batch}")
            free_engine_caches(tts.model)
            launches[str(batch)] = count_decode_launches(tts.model, batch=batch, sampling=sampling).as_dict()

    meta = {
        "dia_fast": __version__,
        "torch": torch.__version__,
        "transformers": _version_of("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": _device_name(device),
        "dtype": str(tts.dtype).replace("torch.", ""),
        **model_info,
        "steps": opts.steps,
        "batches": list(opts.batches),
        "compare": compare,
        "sampling": asdict(sampling),
        "repeat": opts.repeat,
        "timing": (
            "one short untimed call per engine before any batch size, then per batch size one warm-up call per "
            "engine and the engines' timed calls interleaved; the fastest decode kept"
        ),
        "streaming": {"chunk_frames": opts.chunk_frames, "first_chunk_frames": opts.first_chunk_frames, "batch": 1},
        "memory": (
            "peak_memory_bytes = the model's weights + the peak above what was in use just before the engine's "
            "warm-up call at this batch size (CUDA: torch.cuda.max_memory_allocated; CPU: peak resident set, "
            "Linux VmHWM, after the C heap's free pages are handed back), during that call: its buffers, "
            "activations, graph capture (transformers-compile: its compile); one-time costs of a first call were "
            "paid before any measurement; codec excluded"
        ),
        "definitions": {
            "decode_steps_per_s": "decode steps (one frame of every codebook for every item) per second after prefill",
            "steps (per result)": (
                "decode steps in the timed decode window (transformers: the first token comes from its prefill "
                "forward, so one fewer than the tokens generated)"
            ),
            "audio_tokens_per_s": "decode_steps_per_s x channels x batch",
            "realtime_factor": "decode_steps_per_s / codec frame rate (per stream)",
            "time_to_first_audio_s": (
                "streaming, batch 1: from the call to the first PCM chunk (a second stream, after an untimed one)"
            ),
            "prefill_s": "text encoder + decoder prefill",
            "warmup_s": "wall time of the first (warm-up) call, including CUDA-graph capture",
            "decode_steps_per_s_runs": "decode_steps_per_s of every timed run, in order (the spread on a busy machine)",
            "speedup": "decode_steps_per_s ratio over each baseline at the same batch size",
            "speedup_end_to_end": "total generate time ratio (baseline / dia_fast)",
        },
        "ops_backends": ops.table(),
        "ops_backends_used": {op: devs.get(device.type) for op, devs in ops.table().items()},
        "notes": notes,
        "quantize": quant_meta,
        "quality_floor": quality_floor,
        "loading": loading,
        "torch_threads": torch.get_num_threads(),
        "machine_load_at_start": busy,
        "loadavg_1m_at_end": machine_load()["loadavg_1m"],
        **_launch_fields(launches),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": time.perf_counter() - t0,
    }
    doc = document(meta, results)
    if not opts.quiet:
        print(f"dia_fast {__version__} bench: {opts.model} on {meta['device_name']} ({meta['dtype']})")
        print(table(results))
        for batch, c in launches.items():
            kernels = c["cuda_kernels_per_step"]
            print(
                f"launches per decode step, batch {batch}: {c['launches_per_step']:.0f} = "
                f"{c['decoder_layers']} layers x {c['launches_per_layer']:.0f} + {c['launches_outside_layers']:.0f} "
                f"outside (aten ops + Triton launches)"
                + (f"; {kernels:.0f} GPU kernels per step (profiler)" if kernels is not None else "")
            )
            if c.get("cuda_kernel_us_per_step"):
                print(f"GPU kernel time per eager decode step, batch {batch}: {gpu_time_summary(c)}")
        for n in notes:
            print(f"note: {n}")
    if opts.json_path:
        path = write_json(opts.json_path, doc)
        log(f"wrote {path}")
    return doc


def _loading_memory(opts: BenchOptions, tts: DiaTTS, log: Callable[[str], None]) -> dict[str, Any]:
    """Peak and after-load memory of loading the checkpoint in full precision and in each ``--quantize`` mode,
    each in its own process (:mod:`dia_fast.bench.loading`); a preset is written to a temporary checkpoint first."""
    import tempfile

    from .loading import measure_loading

    modes = ["none", *opts.quantize]
    with tempfile.TemporaryDirectory(prefix="dia_fast_bench_") as tmp:
        path: str | Path = opts.model
        if is_preset(opts.model):
            path = tts.save_pretrained(Path(tmp) / "checkpoint")
        log(f"memory while loading the checkpoint: {', '.join(modes)} (one process each)")
        out = measure_loading(path, modes, str(tts.device))
    for mode, row in out.items():
        if "error" in row:
            log(f"  {mode}: {row['error']}")
        else:
            log(
                f"  {mode}: peak {row['peak_bytes'] / 2**20:.0f} MiB while loading, {row['after_bytes'] / 2**20:.0f} "
                f"MiB after, weights {row['weight_bytes'] / 2**20:.0f} MiB, {row['load_s']:.1f} s"
            )
    return out


def _run_load(
    opts: BenchOptions, tts: DiaTTS, model_info: dict[str, Any], log: Callable[[str], None], t0: float
) -> dict[str, Any]:
    """``--load``: continuous batching vs static batches vs one at a time (:mod:`dia_fast.bench.load`)."""
    from .load import load_table, run_load

    rate = "all at once"
    if opts.arrival_rate:
        span = opts.requests / opts.arrival_rate
        rate = f"Poisson arrivals at {opts.arrival_rate:g}/s, over about {span:.0f} s per mode and round"
    min_tokens = max(opts.steps // 4, tts.config.data.max_delay + 2)
    log(f"load: {opts.requests} requests ({rate}), distinct seeds, {min_tokens}-{opts.steps} decode steps each")
    sampling = {} if opts.do_sample else {"do_sample": False}

    def document_of(load: dict[str, Any]) -> dict[str, Any]:
        meta = {
            "dia_fast": __version__,
            "torch": torch.__version__,
            "device": str(tts.device),
            "device_name": _device_name(tts.device),
            "dtype": str(tts.dtype).replace("torch.", ""),
            **model_info,
            "load": {k: v for k, v in load.items() if k not in ("results", "partial")},
            "torch_threads": torch.get_num_threads(),
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "sampling": sampling or {"do_sample": True},
            "definitions": {
                "frames_per_s": "codec frames of all requests / (last finish - first arrival)",
                "latency": "finish - arrival per request (p50, p95)",
                "ttfa": "continuous-stream: arrival to the first streamed PCM chunk; other modes: to the finish",
                "admission_s": "continuous modes: the engine's prefill of each request (encoder + prompt), one at a "
                "time in the scheduler, no step running meanwhile (total and p50 per request)",
                "queued_s": "continuous modes: submit to admission per request (p50, p95)",
            },
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_s": time.perf_counter() - t0,
            **({"partial": True} if load.get("partial") else {}),
        }
        return {"meta": meta, "results": load["results"]}

    def progress(load: dict[str, Any]) -> None:  # a run stopped early keeps the modes it measured
        if opts.json_path:
            write_json(opts.json_path, document_of(load))

    load = run_load(
        tts,
        requests=opts.requests,
        max_slots=opts.max_slots,
        arrival_rate=opts.arrival_rate,
        min_tokens=min_tokens,
        max_tokens=opts.steps,
        sampling=sampling,
        seed=opts.seed,
        repeat=opts.repeat,
        on_progress=progress,
    )
    doc = document_of(load)
    meta = doc["meta"]
    if not opts.quiet:
        print(f"dia_fast {__version__} load bench: {opts.model} on {meta['device_name']} ({meta['dtype']}), {rate}")
        print(load_table(load["results"]))
    if opts.json_path:
        log(f"wrote {write_json(opts.json_path, doc)}")
    return doc


def gpu_time_summary(count: dict[str, Any], top: int = 6) -> str:
    """``count``'s GPU kernel time per step (:class:`~dia_fast.bench.launches.LaunchCount`'s dict) and its largest
    kernels by time, e.g. ``"1234 us; largest: gemm 640 us (52%), ..."``."""
    total = count["cuda_kernel_us_per_step"]
    largest = sorted(count["cuda_kernel_us_by_name"].items(), key=lambda kv: -kv[1])[:top]
    parts = ", ".join(f"{name[:60]} {us:.0f} us ({100 * us / total:.0f}%)" for name, us in largest)
    return f"{total:.0f} us; largest: {parts}"


def _launch_fields(launches: dict[str, Any]) -> dict[str, Any]:
    """The JSON's launch fields: per batch size, and the first batch's at the top level."""
    if not launches:
        return {}
    first = next(iter(launches.values()))
    return {
        "launches_per_step": first["launches_per_step"],
        "launches_per_layer": first["launches_per_layer"],
        "launches_outside_layers": first["launches_outside_layers"],
        "launches": launches,
    }


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip().lower() for x in text.split(",") if x.strip())
    if names == ("none",):
        return ()
    try:
        _check_compare(names)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if twice := _repeated(names):
        raise argparse.ArgumentTypeError(f"lists {twice} twice")
    return names


def _repeated(items: tuple[str, ...]) -> str | None:
    """The first item listed more than once, or None."""
    return next((x for i, x in enumerate(items) if x in items[:i]), None)


# --arrival-rate: below, a run would sleep for minutes between arrivals; above, arrivals are all at once anyway
ARRIVAL_RATE_RANGE = (0.1, 1e6)


# options that only one mode reads: given without it (or beside a mode that ignores them) they are errors
_LOAD_ONLY = ("--requests", "--arrival-rate", "--max-slots")
_QUANTIZE_ONLY = ("--quality-steps", "--cuda-int8", "--no-loading-memory")
_NOT_FOR_LOAD = ("--batch", "--compare", "--quantize", "--count-launches", "--chunk-frames", "--first-chunk-frames")


def _inputs(model: str, codec: str) -> dict[str, str | Path | None]:
    """The files and folders a bench run reads (``{flag: path}``; a missing one is skipped by the checks)."""
    out: dict[str, str | Path | None] = {"--model": None if is_preset(model) else model}
    path = Path(model).expanduser()
    if path.is_file():  # a weights file: its config.json beside it is read too
        out["--model (config.json)"] = path.parent / "config.json"
    out["--codec"] = None if codec in ("auto", "tiny", "44khz") else codec
    return out


def _check_modes(p: argparse.ArgumentParser, a: argparse.Namespace, argv: list[str] | None) -> None:
    """An option the chosen mode would ignore is an error, even at its default value."""
    flags = (*_LOAD_ONLY, *_QUANTIZE_ONLY, *_NOT_FOR_LOAD)
    dests = {flag: flag[2:].replace("-", "_") for flag in flags}  # argparse's own naming
    on_line = given_options(p, argv, a)
    given = {flag for flag, d in dests.items() if d in on_line}
    if not a.load:
        for flag in _LOAD_ONLY:
            if flag in given:
                p.error(f"{flag} applies to --load only")
    else:
        for flag in _NOT_FOR_LOAD:
            if flag in given:
                p.error(f"{flag} does not apply to --load (it measures dia_fast's engines alone)")
    if not a.quantize:
        for flag in _QUANTIZE_ONLY:
            if flag in given:
                p.error(f"{flag} applies to --quantize only")


def parse_args(argv: list[str] | None = None) -> BenchOptions:
    """Command-line options -> :class:`BenchOptions`."""
    p = OneLineParser(
        error_prefix="dia_fast.bench",
        prog="python -m dia_fast.bench",
        description="Benchmark dia_fast against transformers' Dia on identical weights (same process).",
        epilog="--compile-report [--arch sm_90] [--json F] [--quiet]: registers, spills and shared memory of every "
        "Triton kernel, compiled for a GPU architecture without a GPU (see dia_fast.bench.compile_report). "
        "--server-load [--url URL] [...]: HTTP requests against the speech server (--server-load --help).",
    )
    p.add_argument("--model", default="tiny", help="tiny | dia-1.6b (random weights) | PATH to a checkpoint")
    p.add_argument("--device", default=None, help="auto (default) | cpu | cuda | cuda:N | mps")
    p.add_argument(
        "--dtype", default=None, help="auto (bf16 on CUDA, f16 on MPS, f32 on CPU) | float32 | bfloat16 | float16"
    )
    p.add_argument("--batch", type=_ints, default=(1,), help="batch sizes, comma-separated (e.g. 1,8)")
    p.add_argument("--steps", type=int, default=256, help="decode steps per generate call (default 256)")
    p.add_argument(
        "--compare",
        type=_names,
        default=None,
        help=(
            "baselines, comma-separated: transformers, transformers-compile (transformers' static cache + "
            "torch.compile), transformers-bf16 (transformers in bfloat16), eager (dia_fast without step graphs); "
            "default: transformers, transformers-compile and eager on CUDA, transformers and eager on CPU/MPS; "
            "'none' for dia_fast alone"
        ),
    )
    p.add_argument("--json", dest="json_path", default=None, help="write the results as JSON to this file")
    p.add_argument("--layers", type=int, default=None, help="N encoder and N decoder layers (quick runs of a preset)")
    p.add_argument("--codec", default="auto", help="auto | tiny | 44khz (random DAC) | PATH (codec checkpoint)")
    p.add_argument("--sample", dest="do_sample", action="store_true", help="sample (default: greedy decoding)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per configuration, fastest kept (default 2)")
    p.add_argument("--chunk-frames", type=int, default=43, help="streaming chunk size in codec frames")
    p.add_argument("--first-chunk-frames", type=int, default=16, help="first streaming chunk in codec frames")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--quiet", action="store_true", help="no progress and no table (use with --json)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: 1 for small models such as tiny, else torch's; recorded in the JSON)",
    )
    p.add_argument(
        "--count-launches",
        action="store_true",
        help="count the launches of one decode step (non-view aten ops + Triton kernels; on CUDA also the GPU "
        "kernels the profiler sees): launches_per_step / launches_per_layer in the JSON",
    )
    p.add_argument(
        "--load",
        action="store_true",
        help="load benchmark: --requests concurrent requests (steps/4..--steps decode steps, distinct seeds) "
        "through continuous batching, static batches and one at a time",
    )
    p.add_argument("--requests", type=int, default=16, help="--load: number of requests (default 16)")
    p.add_argument(
        "--arrival-rate",
        type=float,
        default=None,
        help="--load: Poisson arrivals, requests per second (default: all at once)",
    )
    p.add_argument("--max-slots", type=int, default=None, help="--load: continuous batch size (default: the device's)")
    p.add_argument(
        "--quantize",
        default="",
        help="comma-separated int8,fp8,int4: quantized copies of the model run beside it (engines dia_fast-MODE), "
        "with a quality block per mode in the JSON (docs/quantization.md)",
    )
    p.add_argument("--quality-steps", type=int, default=200, help="--quantize: teacher-forced steps (default 200)")
    p.add_argument(
        "--cuda-int8",
        default="",
        help="--quantize on CUDA: comma-separated int8 kernels to run, torchao and/or dia_fast (the Triton kernel); "
        "with both, engines dia_fast-MODE-torchao and dia_fast-MODE-dia_fast (default: the library's default)",
    )
    p.add_argument(
        "--no-loading-memory",
        action="store_true",
        help="--quantize: skip measuring the memory of loading the checkpoint per mode (one process each)",
    )
    a = p.parse_args(argv)
    _check_modes(p, a, argv)
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    if len(set(a.batch)) != len(a.batch):
        p.error(f"--batch lists a size twice: {','.join(map(str, a.batch))}")
    if a.chunk_frames < 1 or a.first_chunk_frames < 1:
        p.error("--chunk-frames and --first-chunk-frames must be >= 1")
    if a.threads is not None and a.threads > 4 * (os.cpu_count() or 1):
        p.error(f"--threads {a.threads} is more than 4x this machine's {os.cpu_count()} CPUs")
    if a.json_path is not None:
        a.json_path = str(Path(a.json_path).expanduser())  # once, here: every later use takes it as it is
        if problem := unwritable_file("--json", Path(a.json_path), "out.json") or overwrites_input(
            "--json", a.json_path, _inputs(a.model, a.codec)
        ):
            p.error(problem)
    if a.layers is not None and a.layers < 1:
        p.error("--layers must be >= 1")
    if a.requests < 1:
        p.error("--requests must be >= 1")
    low, high = ARRIVAL_RATE_RANGE
    if a.arrival_rate is not None and not low <= a.arrival_rate <= high:
        p.error(
            f"--arrival-rate must be between {low:g} and {high:.0f} requests per second, got {a.arrival_rate:g} "
            "(leave it out for all requests at once)"
        )
    if a.max_slots is not None and (a.max_slots < 1 or a.max_slots & (a.max_slots - 1)):
        p.error("--max-slots must be a power of two >= 1")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be >= 1")
    modes = tuple(m.strip() for m in a.quantize.split(",") if m.strip() and m.strip() != "none")
    bad = [m for m in modes if m not in ("int8", "fp8", "int4")]
    if bad:
        p.error(f"--quantize: unknown mode(s) {', '.join(bad)}; valid: int8, fp8, int4")
    if twice := _repeated(modes):
        p.error(f"--quantize lists {twice} twice: {a.quantize}")
    from ..quantize import CUDA_INT8_KERNELS

    cuda_int8 = tuple(k.strip() for k in a.cuda_int8.split(",") if k.strip())
    bad = [k for k in cuda_int8 if k not in CUDA_INT8_KERNELS]
    if bad:
        p.error(f"--cuda-int8: unknown kernel(s) {', '.join(bad)}; valid: {', '.join(CUDA_INT8_KERNELS)}")
    if twice := _repeated(cuda_int8):
        p.error(f"--cuda-int8 lists {twice} twice: {a.cuda_int8}")
    if (data := model_data_config(a.model)) is not None:  # before anything is built or run
        for flag, steps in (("--steps", a.steps), ("--quality-steps", a.quality_steps if modes else None)):
            if steps is not None and (problem := steps_problem(flag, steps, data)):
                p.error(problem)
    return BenchOptions(
        model=a.model,
        device=a.device,
        dtype=a.dtype,
        batches=a.batch,
        steps=a.steps,
        compare=a.compare,
        json_path=a.json_path,
        layers=a.layers,
        codec=a.codec,
        do_sample=a.do_sample,
        repeat=a.repeat,
        chunk_frames=a.chunk_frames,
        first_chunk_frames=a.first_chunk_frames,
        seed=a.seed,
        quiet=a.quiet,
        count_launches=a.count_launches,
        load=a.load,
        requests=a.requests,
        arrival_rate=a.arrival_rate,
        max_slots=a.max_slots,
        threads=a.threads,
        quantize=modes,
        loading_memory=not a.no_loading_memory,
        quality_steps=a.quality_steps,
        cuda_int8=cuda_int8,
    )


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show each Python warning raised inside the block as one line, ``dia_fast.bench: warning: MESSAGE`` on
    stderr (no source line; where it came from when that is outside dia_fast), as the main CLI does; the warning
    filters still decide which are shown."""

    def show(message: Warning | str, _category: object, filename: str, lineno: int, *_: object, **__: object) -> None:
        print(warning_line("dia_fast.bench", message, filename, lineno), file=sys.stderr, flush=True)

    with warnings.catch_warnings():  # restores the previous showwarning afterwards
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dia_fast.bench``. Ctrl-C: "interrupted", exit 130 (the JSON keeps what was
    written: the bench writes it after every batch size)."""
    args = sys.argv[1:] if argv is None else argv
    with one_line_warnings():
        try:
            if "--compile-report" in args:  # a report of its own: dia_fast.bench.compile_report
                from .compile_report import main as compile_report_main

                return compile_report_main(args)
            if "--server-load" in args:  # HTTP requests against the speech server: dia_fast.bench.server_load
                from .server_load import main as server_load_main

                return server_load_main(args)
            run_bench(parse_args(argv))
        except (ValueError, FileNotFoundError) as exc:
            print(f"dia_fast.bench: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("dia_fast.bench: interrupted", file=sys.stderr)
            return 130
    return 0

"""``python -m dia_fast.serve``: run the OpenAI-compatible speech server (uvicorn, or Ray Serve with ``--ray``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from ..cliparse import OneLineParser
from .ray_app import LOG_FORMAT
from .settings import ServerSettings


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        error_prefix="dia_fast.serve",
        prog="python -m dia_fast.serve",
        description="OpenAI-compatible speech server for Dia with continuous batching and streaming.",
        epilog="Without --model it serves a random-weight tiny demo model (the audio is not speech).",
    )
    p.add_argument("--model", help="checkpoint directory/file or hub id (default: the random demo model)")
    p.add_argument("--codec", help="codec checkpoint, 'dac' or 'encodec' (default: the model's DAC)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--device",
        help="cpu, cuda, cuda:1, mps (default: the best available; with --ray: cuda when --gpus-per-replica > 0, "
        "else cpu)",
    )
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: the device's)")
    p.add_argument("--quantize", choices=("int8", "fp8", "int4"), help="quantize the decoder (docs/quantization.md)")
    p.add_argument("--max-batch", type=int, help="requests decoded together (default: 16 CUDA, 4 MPS, 8 CPU)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most, then 429 (default 64)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: none)")
    p.add_argument("--voices-dir", type=Path, help="directory of stored voices (default: no stored voices)")
    p.add_argument("--max-input-chars", type=int, default=4096, help="longest input text (default 4096)")
    p.add_argument("--model-id", help="the model id /v1/models lists (default: the checkpoint's folder name)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    g = p.add_argument_group("Ray Serve (scale out)")
    g.add_argument("--ray", action="store_true", help="run as Ray Serve replicas instead of one uvicorn process")
    g.add_argument("--replicas", type=int, default=1, help="--ray: replicas (default 1)")
    g.add_argument("--max-replicas", type=int, help="--ray: autoscale from --replicas up to this many")
    g.add_argument(
        "--gpus-per-replica",
        type=float,
        default=0.0,
        help="--ray: GPUs per replica (default 0: the replicas run on the CPU; give 1 for a GPU each)",
    )
    g.add_argument("--ray-address", help="--ray: an existing cluster (default: start a local one)")
    return p


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from . import missing_server_packages

    missing = missing_server_packages() + (["ray[serve]"] if args.ray and _no_ray() else [])
    if missing:
        extra = "ray" if args.ray else "server"
        print(f'python -m dia_fast.serve: needs {", ".join(missing)}: pip install "dia-fast[{extra}]"', file=sys.stderr)
        return 2
    try:
        settings = ServerSettings(
            model=args.model,
            codec=args.codec,
            quantize=args.quantize,
            device=args.device,
            dtype=args.dtype,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            api_key=args.api_key,
            voices_dir=args.voices_dir,
            max_input_chars=args.max_input_chars,
            model_id=args.model_id,
        )
        if args.ray:
            if not args.gpus_per_replica >= 0:
                raise ValueError(f"--gpus-per-replica must be >= 0, got {args.gpus_per_replica}")
            from .ray_app import replica_settings

            device = replica_settings(settings, args.gpus_per_replica).device  # (what each replica runs on)
            if device == "cpu" and settings.device is None and _cuda_here():
                warnings.warn(
                    "--ray without --gpus-per-replica: the replicas run on the CPU although this machine has a GPU "
                    "(give --gpus-per-replica 1 for a GPU each)",
                    stacklevel=1,
                )
        else:
            device = settings.device
        # a device, dtype or quantization mode this machine cannot run, or a checkpoint that is not there: an
        # error before the server starts (loading itself happens at start-up). Not with --ray-address (or
        # RAY_ADDRESS): the replicas run on the cluster's machines, where these paths and devices may well exist.
        if not (args.ray and (args.ray_address or os.environ.get("RAY_ADDRESS"))):
            _check_local(args, settings, device)
        if not 0 < args.port < 65536:
            raise ValueError(f"--port must be 1-65535, got {args.port}")
        if args.replicas < 1 or (args.max_replicas is not None and args.max_replicas < args.replicas):
            raise ValueError("--replicas must be >= 1 and --max-replicas >= --replicas")
    except ValueError as exc:
        print(f"dia_fast.serve: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    if args.ray:
        from .ray_app import run_ray

        run_ray(
            settings,
            host=args.host,
            port=args.port,
            replicas=args.replicas,
            max_replicas=args.max_replicas,
            gpus_per_replica=args.gpus_per_replica,
            address=args.ray_address,
            log_level=args.log_level,
        )
        return 0
    from . import create_app
    from .graceful import graceful_server

    # uvicorn.run's single-process path, with the settings' shutdown limit and running requests answered before it
    server = graceful_server(create_app(settings), host=args.host, port=args.port, log_level=args.log_level)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 3  # 3: the start failed (uvicorn's code; the log says why)


def _check_local(args: argparse.Namespace, settings: ServerSettings, device: str | None) -> None:
    """The checks of the options against this machine: device, dtype and quantization, checkpoints, voices dir."""
    from ..checkpoint import is_hub_id
    from ..devices import resolve_device, resolve_dtype
    from ..quantize import check_quantize

    dev = resolve_device(device)
    check_quantize(settings.quantize, dev, resolve_dtype(settings.dtype, dev))
    if args.model and not Path(args.model).expanduser().exists() and not is_hub_id(args.model):
        raise ValueError(f"--model: checkpoint not found: {args.model}")
    codec = args.codec
    if codec and codec.lower() not in ("dac", "encodec") and not Path(codec).expanduser().exists():
        raise ValueError(f"--codec: codec checkpoint not found: {codec} (a path, 'dac' or 'encodec')")
    if args.voices_dir is not None:
        if args.voices_dir.exists() and not args.voices_dir.is_dir():
            raise ValueError(f"--voices-dir: {args.voices_dir} is not a directory")
        try:  # (the server would create it at start-up)
            args.voices_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--voices-dir: cannot create {args.voices_dir}: {exc.strerror}") from None


def _no_ray() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is None


if __name__ == "__main__":
    sys.exit(main())

"""The device-side paths (prefill, the decode step, continuous batching's admit and slot step) on a device that is
not the CPU, without a GPU: the ``meta`` device.

CPU tests cannot see a tensor that is made on the CPU by mistake (``torch.arange(n)`` without ``device=``) or
a dtype that only goes wrong off the CPU, and no GPU has run this code yet. The steps are pure tensor work without
host syncs (engine.py's design), so they run whole on ``meta``, under :class:`CudaDeviceRules`: every aten op
checks its tensors' devices as CUDA does (meta alone checks only some ops: ``add_`` and ``matmul`` take a CPU
tensor there). The ops take their PyTorch references (the dispatch has no other backend for ``meta``): the Triton
kernels' launchers are covered by the interpreter tests and ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dia_fast import ops
from dia_fast.codec.dac import DacCodec
from dia_fast.codec.encodec import EncodecCodec
from dia_fast.config import DiaConfig
from dia_fast.generation.engine import StepSpec, allocate_buffers, decode_step
from dia_fast.generation.sampling import SamplingConfig
from dia_fast.model import DiaModel
from dia_fast.quantize import quantize_decoder
from dia_fast.serving.slots import admit, allocate_slots, slot_step

META = torch.device("meta")

# Ops that take tensors from another device on CUDA: copies, and CPU index tensors (torch moves them).
_CROSS_DEVICE_OPS = {"aten::copy_", "aten::_to_copy", "aten::to", "aten::_copy_from", "aten::lift_fresh"}
_INDEX_OPS = {"aten::index", "aten::index_put_", "aten::_index_put_impl_", "aten::index_put"}


class CudaDeviceRules(TorchDispatchMode):
    """Raises where an aten op mixes meta tensors with CPU tensors that CUDA would refuse: any CPU tensor of more
    than 0 dimensions beside a meta one (0-dim CPU tensors are scalars to CUDA kernels), except in copies and as
    index tensors. ``seen`` counts the ops checked."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = func._schema.name
        if name not in _CROSS_DEVICE_OPS:
            checked = (args[:1], args[2:], kwargs) if name in _INDEX_OPS else (args, kwargs)
            tensors = [t for t in tree_flatten(checked)[0] if isinstance(t, torch.Tensor)]
            if any(t.device == META for t in tensors):
                cpu = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.dim() > 0]
                if cpu:
                    raise AssertionError(f"{func}: CPU tensors of shapes {cpu} beside device tensors")
            self.seen += 1
        return func(*args, **kwargs)


def _meta_model(dtype: torch.dtype = torch.bfloat16, quantize: str | None = None) -> DiaModel:
    model = DiaModel(DiaConfig.preset("tiny")).eval().requires_grad_(False)
    if quantize is not None:
        quantize_decoder(model, quantize)
    return model.to(device=META, dtype=dtype)


def _spec(model: DiaModel, batch: int, use_cfg: bool) -> StepSpec:
    data = model.config.data
    return StepSpec(
        batch=batch,
        use_cfg=use_cfg,
        channels=data.channels,
        eos_value=data.audio_eos_value,
        pad_value=data.audio_pad_value,
        max_delay=data.max_delay,
        sampler=ops.select_backend("cfg_sample", META),
    )


def _all_on_meta(obj: object) -> list[str]:
    """Names of the tensors among ``obj``'s attributes (and its ``state``'s) that are not on the meta device."""
    tensors = {k: v for k, v in vars(obj).items() if isinstance(v, torch.Tensor)}
    state = getattr(obj, "state", None)
    if state is not None:
        tensors |= {f"state.{k}": v for k, v in vars(state).items() if isinstance(v, torch.Tensor)}
    return [k for k, v in tensors.items() if v.device != META]


def test_the_rules_refuse_what_cuda_refuses() -> None:
    x = torch.zeros(3, device=META)
    with CudaDeviceRules():
        x + torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar
        x[torch.tensor([0, 2])]  # CPU index tensors are moved
        x.copy_(torch.ones(3))
        for bad in (
            lambda: x.add_(torch.ones(1)),
            lambda: x @ torch.ones(3),
            lambda: torch.where(x > 0, x, torch.ones(3)),
        ):
            with pytest.raises(AssertionError, match="CPU tensors"):
                bad()


def test_meta_dispatch_takes_the_references() -> None:
    assert ops.select_backend("decode_attention", META) == "torch"
    assert ops.select_backend("cfg_sample", META) == "torch"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("batch", "use_cfg"), [(1, True), (3, True), (2, False)])
def test_prefill_and_decode_steps_stay_on_the_device(dtype: torch.dtype, batch: int, use_cfg: bool) -> None:
    model = _meta_model(dtype)
    spec = _spec(model, batch, use_cfg)
    R, T = spec.rows, 12
    with torch.inference_mode(), CudaDeviceRules() as rules:
        ids = torch.zeros(R, T, dtype=torch.long, device=META)
        mask = torch.ones(R, T, dtype=torch.bool, device=META)
        enc = model.encode(ids, mask)
        assert (enc.device, enc.dtype, enc.shape) == (META, dtype, (R, T, model.config.model.encoder.hidden_size))
        state = model.new_state(enc, mask, 40)
        prefix = torch.zeros(R, 3, model.config.data.channels, dtype=torch.long, device=META)
        logits = model.decoder(prefix, state, last_only=True)
        assert logits.device == META and logits.shape[:3] == (R, 1, model.config.data.channels)

        bufs = allocate_buffers(model, spec, 40, T, self_mask=True)
        for _ in range(3):
            decode_step(model, spec, bufs)
    assert rules.seen > 100
    assert _all_on_meta(bufs) == []
    assert bufs.logits.dtype == dtype
    assert bufs.out.dtype == torch.long and bufs.tokens.dtype == torch.long
    assert bufs.pos.dtype == torch.long and bufs.done.dtype == torch.bool


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_decode_step_stays_on_the_device(mode: str) -> None:
    model = _meta_model(torch.bfloat16, quantize=mode)
    spec = _spec(model, 2, True)
    with torch.inference_mode(), CudaDeviceRules() as rules:
        bufs = allocate_buffers(model, spec, 32, 8, self_mask=False)
        for _ in range(2):
            decode_step(model, spec, bufs)
    assert rules.seen > 50
    assert _all_on_meta(bufs) == []
    assert bufs.logits.dtype == torch.bfloat16


def test_admit_and_slot_step_stay_on_the_device() -> None:
    model = _meta_model()
    slots = allocate_slots(model, 4, 48, 16)
    ids = torch.ones(1, 10, dtype=torch.long)  # CPU inputs, as the engine passes them
    mask = torch.ones(1, 10, dtype=torch.bool)
    prompt = torch.randint(0, 1024, (5, model.config.data.channels), generator=torch.Generator().manual_seed(0))
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, cfg_scale=3.0, cfg_filter_top_k=50)
    with torch.inference_mode(), CudaDeviceRules() as rules:
        p0 = admit(model, slots, 1, ids, mask, prompt, 20, 0, sampling, seed=7)
        admit(model, slots, 3, ids[:, :6], mask[:, :6], None, 20, 2, sampling, seed=8)
        for _ in range(3):
            slot_step(model, slots)
    assert rules.seen > 100
    assert p0 == 6  # BOS + the 5 prompt frames
    assert _all_on_meta(slots) == []
    assert slots.logits.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["dac", "encodec"])
def test_codec_stacks_stay_on_the_device(kind: str, dtype: torch.dtype) -> None:
    """The codecs' network stacks (encode and decode, minus the input checks that read values on the host)."""
    codec = (DacCodec if kind == "dac" else EncodecCodec).random().to(device=META, dtype=dtype)
    codes = torch.zeros(2, 20, codec.n_codebooks, dtype=torch.long, device=META)
    wav = torch.zeros(2, 1, 20 * codec.hop_length, device=META, dtype=dtype)
    with torch.inference_mode(), CudaDeviceRules() as rules:
        if kind == "dac":
            pcm = codec.decode_latent(codec.quantizer.dequantize(codes))
            got = codec.quantize(codec.encoder(wav)).codes
        else:
            pcm = codec.decoder(codec.quantizer.decode(codes))[:, 0]
            got = codec.quantizer.encode(codec.encoder(wav), codec.n_codebooks).transpose(1, 2)
    assert rules.seen > 50
    assert (pcm.device, pcm.shape) == (META, (2, 20 * codec.hop_length))
    assert (got.device, got.dtype, got.shape) == (META, torch.long, (2, codec.n_codebooks, 20))

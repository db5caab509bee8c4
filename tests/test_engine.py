"""The decode engine: the pure step function against a plain reference loop, sync/pool/static variants,
precision of the buffers, and (GPU) CUDA graphs against eager steps."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dia_fast import ops
from dia_fast.config import DiaConfig
from dia_fast.generation.engine import (
    DecodeEngine,
    StepSpec,
    allocate_buffers,
    bucket_batch,
    decode_step,
    engine_for,
)
from dia_fast.generation.generate import build_prefix, generate_codes
from dia_fast.generation.sampling import SamplingConfig
from dia_fast.memory import PinnedPool
from dia_fast.model import DiaModel
from dia_fast.ops import reference
from dia_fast.text import encode_batch

TEXTS = ["[S1] Hello there. [S2] Hi!", "[S1] A longer sentence (laughs) to pad the other one.", "[S2] Third."]
GREEDY = SamplingConfig(do_sample=False)
SAMPLED = SamplingConfig(cfg_scale=3.0, temperature=1.2, top_p=0.9, cfg_filter_top_k=45)


def _model(seed: int = 0, eos_token: int | None = 613, device: str = "cpu") -> DiaModel:
    torch.manual_seed(seed)
    model = DiaModel(DiaConfig.preset("tiny")).eval().to(device)
    if eos_token is not None:
        # Channel 0's EOS logit slightly above a common token's: items stop on their own, at different steps.
        with torch.no_grad():
            w = model.decoder.logits_dense.weight
            w[1024] = 1.05 * w[eos_token]
    return model


@pytest.fixture(scope="module")
def model() -> DiaModel:
    """Some items stop on their own (at different steps), others run to the length limit."""
    return _model()


@pytest.fixture
def torch_sampler():
    """Sample with the PyTorch backend (the reference itself)."""
    ops.set_backend("torch", "cfg_sample")
    yield
    ops.set_backend(None, "cfg_sample")


@pytest.fixture(scope="module")
def early_model() -> DiaModel:
    """Every item stops on its own within a few steps."""
    return _model(eos_token=250)


def _prompts(config: DiaConfig) -> list[torch.Tensor | None]:
    g = torch.Generator().manual_seed(5)
    return [
        torch.randint(0, 1024, (6, config.data.channels), generator=g),
        None,
        torch.randint(0, 1024, (2, 9), generator=g),
    ]


@torch.inference_mode()
def _reference_loop(model, texts, prompts, max_new_tokens, sampling, generator=None):
    """Plain generation loop: full caches, one decoder call per step, the reference's seeded draws (one Philox
    key per item from ``generator``, the item's own position as the counter: the batch position less the item's
    left padding, i.e. where it would be alone), and Dia's EOS countdown written out item by item. Returns the
    whole delayed sequences [B, L, C] and EOS positions."""
    cfg = model.config
    data = cfg.data
    ids, mask = encode_batch(texts)
    B, C, md = len(texts), data.channels, data.max_delay
    prefix = build_prefix(cfg, prompts, torch.device("cpu"))
    P0 = prefix.length
    L = P0 + max_new_tokens
    rows = 2 if sampling.use_cfg else 1
    enc_ids = torch.cat([ids, torch.zeros_like(ids)]) if rows == 2 else ids
    enc_mask = mask.repeat(rows, 1)
    self_mask = None
    if prefix.self_mask is not None:
        self_mask = torch.ones(B, L, dtype=torch.bool)
        self_mask[:, :P0] = prefix.self_mask
        self_mask = self_mask.repeat(rows, 1)
    state = model.new_state(model.encode(enc_ids, enc_mask), enc_mask, L, self_mask)
    seq = torch.full((B, L, C), data.audio_pad_value, dtype=torch.long)
    seq[:, :P0] = prefix.forced[:, :P0]
    logits = model.decoder(seq[:, :P0].repeat(rows, 1, 1), state)[:, -1]
    seeds = torch.randint(0, 2**62, (B,), generator=generator)
    eos = [-1] * B
    for p in range(P0, L):
        cond, uncond = (logits[:B], logits[B:]) if rows == 2 else (logits, logits)
        codes = reference.cfg_sample(
            cond,
            uncond,
            cfg_scale=sampling.cfg_scale,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.cfg_filter_top_k,
            eos_id=data.audio_eos_value,
            do_sample=not sampling.greedy,
            seed=seeds,
            offset=torch.tensor([p - (P0 - 1 - f) for f in prefix.prompt_frames]),
        )
        for b in range(B):
            if eos[b] < 0 and (int(codes[b, 0]) == data.audio_eos_value or p >= L - md - 1):
                eos[b] = p
            if eos[b] >= 0:
                for c, d in enumerate(data.delay_pattern):
                    if p - eos[b] == d:
                        codes[b, c] = data.audio_eos_value
                    elif p - eos[b] > d:
                        codes[b, c] = data.audio_pad_value
            if p < prefix.forced.shape[1]:
                f = prefix.forced[b, p]
                codes[b] = torch.where(f >= 0, f, codes[b])
        seq[:, p] = codes
        logits = model.decoder(codes.repeat(rows, 1)[:, None], state, torch.tensor([p]))[:, 0]
    return seq, torch.tensor(eos), P0


def _check_against_reference(out, ref, ref_eos):
    assert torch.equal(out.eos_pos, ref_eos)
    end = out.delayed.shape[1]
    assert torch.equal(out.delayed, ref[:, :end])
    # past the crop, the reference holds only PAD (every item had finished)
    assert bool((ref[:, end:] == 1025).all())


# ---------------------------------------------------------------------------------------------- step


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_engine_equals_reference_loop(model, sampling, torch_sampler):
    prompts = _prompts(model.config)
    ref, ref_eos, P0 = _reference_loop(model, TEXTS, prompts, 60, sampling, torch.Generator().manual_seed(11))
    ids, mask = encode_batch(TEXTS)
    out = generate_codes(
        model,
        ids,
        mask,
        prompts=prompts,
        max_new_tokens=60,
        sampling=sampling,
        generator=torch.Generator().manual_seed(11),
        progress=False,
    )
    assert out.prefix_length == P0 and not out.cuda_graphs and out.warmup_seconds == 0.0
    assert out.delayed.device.type == "cpu"
    _check_against_reference(out, ref, ref_eos)
    # some items stopped on their own before the forced end (the countdown was exercised), some did not
    forced_end = P0 + 60 - model.config.data.max_delay - 1
    assert int(ref_eos.min()) < forced_end == int(ref_eos.max())


def test_sampling_without_cfg_equals_reference(model, torch_sampler):
    sampling = SamplingConfig(cfg_scale=0.0, temperature=1.0, top_p=0.8, cfg_filter_top_k=None)
    ref, ref_eos, _ = _reference_loop(model, TEXTS[:2], [None, None], 40, sampling, torch.Generator().manual_seed(3))
    ids, mask = encode_batch(TEXTS[:2])
    out = generate_codes(
        model, ids, mask, max_new_tokens=40, sampling=sampling, generator=torch.Generator().manual_seed(3)
    )
    _check_against_reference(out, ref, ref_eos)


def _spec(model, batch: int, use_cfg: bool = True, sampler: str = "torch") -> StepSpec:
    cfg = model.config
    return StepSpec(batch, use_cfg, cfg.data.channels, 1024, 1025, cfg.data.max_delay, sampler)


def _set_sampling(bufs, sampling: SamplingConfig, seed: int = 0) -> None:
    bufs.set_sampling(sampling)
    bufs.seeds.copy_(torch.arange(seed, seed + bufs.seeds.numel()))


def test_decode_step_is_pure_over_its_buffers(model):
    """Two identical buffer sets stepped side by side stay identical, and a step touches nothing else."""
    spec = _spec(model, 2)
    a = allocate_buffers(model, spec, 32, 8, self_mask=True)
    g = torch.Generator().manual_seed(0)
    for t in (a.state.cross_k, a.state.cross_v, a.logits):
        t.copy_(torch.randn(t.shape, generator=g))
    a.pos.fill_(3)
    _set_sampling(a, SAMPLED)
    b = allocate_buffers(model, spec, 32, 8, self_mask=True)
    for name, t in vars(a).items():
        if isinstance(t, torch.Tensor):
            getattr(b, name).copy_(t)
    for name, t in vars(a.state).items():
        if isinstance(t, torch.Tensor):
            getattr(b.state, name).copy_(t)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        for _ in range(5):
            decode_step(model, spec, a)
            decode_step(model, spec, b)
    assert int(a.pos) == 8
    assert torch.equal(a.out, b.out) and torch.equal(a.logits, b.logits) and torch.equal(a.state.self_k, b.state.self_k)
    assert bool((a.out[:, 3:8] != 1025).all()) and bool((a.out[:, 8:] == 1025).all())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize("sync_every", [1, 3, 1000])
def test_sync_every_does_not_change_the_codes(early_model, sync_every):
    ids, mask = encode_batch(TEXTS)
    base = generate_codes(early_model, ids, mask, max_new_tokens=60, sampling=GREEDY, sync_every=8)
    out = generate_codes(early_model, ids, mask, max_new_tokens=60, sampling=GREEDY, sync_every=sync_every)
    assert torch.equal(out.delayed, base.delayed) and torch.equal(out.eos_pos, base.eos_pos)
    md = early_model.config.data.max_delay
    finished = int((base.eos_pos + md).max())  # the position where the last item wrote its last EOS
    P0 = base.prefix_length
    assert finished < P0 + 60 - 1  # every item stopped before the length limit
    # the loop stops at the first poll after the end: at most sync_every - 1 extra steps on the CPU
    assert finished - P0 + 1 <= out.steps <= min(finished - P0 + sync_every, 60)


def test_on_step_sees_final_prefix(model):
    ids, mask = encode_batch(TEXTS[:2])
    seen: list[torch.Tensor] = []

    def on_step(buf: torch.Tensor, p: int) -> None:
        seen.append(buf[:, : p + 1].clone())

    out = generate_codes(model, ids, mask, max_new_tokens=40, sampling=GREEDY, on_step=on_step)
    assert len(seen) == out.steps
    for s in seen:
        n = min(s.shape[1], out.delayed.shape[1])
        assert torch.equal(s[:, :n], out.delayed[:, :n])


# ---------------------------------------------------------------------------------------------- pool


def test_pool_on_off_gives_identical_codes(model):
    ids, mask = encode_batch(TEXTS)
    prompts = _prompts(model.config)
    pool = PinnedPool(max_bytes=1 << 22)
    kw = dict(prompts=prompts, max_new_tokens=50, sampling=SAMPLED)
    off = generate_codes(model, ids, mask, pool=False, generator=torch.Generator().manual_seed(2), **kw)
    on = generate_codes(model, ids, mask, pool=pool, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(on.delayed, off.delayed) and torch.equal(on.eos_pos, off.eos_pos)
    s = pool.stats()
    assert s["misses"] > 0 and s["buffers_in_use"] == 0  # used, and every buffer given back
    again = generate_codes(model, ids, mask, pool=pool, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(again.delayed, off.delayed)
    assert pool.stats()["hits"] > 0  # the second call reused the first one's buffers
    # results own their memory: the pooled buffers were copied out, not handed over
    assert on.delayed.data_ptr() != again.delayed.data_ptr()


# ---------------------------------------------------------------------------------------------- static buffers


def test_buckets():
    assert [bucket_batch(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_static_engine_equals_eager_and_reuses_its_buffers(model):
    """Bucketed, cached buffers (what CUDA graphs replay on), run eagerly: same codes as exact-shape buffers,
    and a second call on the same bucket (reusing dirty buffers) gives the same codes again."""
    prompts = _prompts(model.config)
    ids, mask = encode_batch(TEXTS)
    kw = dict(prompts=prompts, max_new_tokens=50, sampling=GREEDY)
    eager = generate_codes(model, ids, mask, engine=DecodeEngine(model, static=False), **kw)
    engine = DecodeEngine(model, static=True)
    data = model.config.data
    assert engine.shapes(3, 57, 40) == (4, data.audio_length, data.text_length)  # the model's limits
    first = generate_codes(model, ids, mask, engine=engine, **kw)
    assert first.batch_bucket == 4 and not first.cuda_graphs
    assert torch.equal(first.delayed, eager.delayed) and torch.equal(first.eos_pos, eager.eos_pos)
    (runner,) = engine._entries.values()
    # another batch in the same bucket dirties the buffers, then the first batch again
    other = generate_codes(model, ids[:2], mask[:2], prompts=[None, prompts[2]], max_new_tokens=50, engine=engine)
    assert other.batch_bucket == 2 and len(engine._entries) == 2
    ids4, mask4 = encode_batch(TEXTS + ["[S1] four"])
    four = generate_codes(model, ids4, mask4, max_new_tokens=50, sampling=GREEDY, engine=engine)
    assert len(engine._entries) == 2 and four.batch_bucket == 4  # ran on the first call's runner
    again = generate_codes(model, ids, mask, engine=engine, **kw)
    assert torch.equal(again.delayed, eager.delayed) and torch.equal(again.eos_pos, eager.eos_pos)
    assert runner in engine._entries.values()


def test_engine_for_is_shared_and_cpu_defaults_to_eager(model):
    eng = engine_for(model)
    assert engine_for(model) is eng and not eng.is_static and not eng.graphs_enabled(True)
    assert "_dia_fast_engine" not in model.state_dict()


# ---------------------------------------------------------------------------------------------- precision


def test_bf16_model_writes_logits_in_its_dtype():
    """The output GEMM writes the logits buffer itself (no cast, no copy); the sampler reads them in fp32."""
    model = _model(eos_token=None).to(torch.bfloat16)
    bufs = allocate_buffers(model, _spec(model, 1), 16, 8, self_mask=False)
    assert bufs.logits.dtype == torch.bfloat16 and bufs.state.self_k.dtype == torch.bfloat16
    ids, mask = encode_batch(TEXTS[:1])
    out = generate_codes(model, ids, mask, max_new_tokens=24, sampling=GREEDY)
    assert out.delayed.shape == (1, 25, 9)
    assert bool(((out.delayed >= 0) & (out.delayed <= 1026)).all())


def test_new_settings_and_longer_texts_reuse_one_runner(model):
    """Sampling settings and lengths are buffer contents, not part of a runner's key: one static runner (one
    CUDA graph on a GPU) serves greedy and sampled calls, any temperature / top-p / top-k / CFG scale, and texts
    and prompts of any length; each call still equals its eager run."""
    engine = DecodeEngine(model, static=True)
    eager = DecodeEngine(model, static=False)
    calls = [
        (TEXTS[:2], GREEDY, None),
        (TEXTS[1:3], SAMPLED, None),
        (TEXTS[:2], SamplingConfig(cfg_scale=1.5, temperature=0.7, top_p=0.6, cfg_filter_top_k=None), None),
        ([TEXTS[1] * 3, TEXTS[2]], SamplingConfig(cfg_scale=3.0, temperature=1.8, top_p=1.0, cfg_filter_top_k=5), 7),
    ]
    for texts, sampling, prompt_frames in calls:
        ids, mask = encode_batch(texts)
        prompts = None
        if prompt_frames:
            prompts = [torch.randint(0, 1024, (prompt_frames, 9), generator=torch.Generator().manual_seed(1)), None]
        kw = dict(prompts=prompts, max_new_tokens=40, sampling=sampling)
        a = generate_codes(model, ids, mask, engine=engine, generator=torch.Generator().manual_seed(4), **kw)
        b = generate_codes(model, ids, mask, engine=eager, generator=torch.Generator().manual_seed(4), **kw)
        assert torch.equal(a.delayed, b.delayed) and torch.equal(a.eos_pos, b.eos_pos)
    assert len(engine._entries) == 1


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_gpu_graphs_equal_eager_greedy(batch):
    model = _model(device="cuda").to(torch.bfloat16)
    texts = TEXTS[:batch]
    ids, mask = encode_batch(texts, pad_to_multiple=128)  # text length at its bucket: same buffers as eager
    prompts = _prompts(model.config)[:batch]
    kw = dict(prompts=prompts, max_new_tokens=60, sampling=GREEDY)
    # eager steps on the very same bucketed buffers (static engine, graphs off)
    eager = generate_codes(
        model, ids, mask, engine=DecodeEngine(model, static=True, cuda_graphs=False), pool=False, **kw
    )
    engine = DecodeEngine(model)
    graphed = generate_codes(model, ids, mask, engine=engine, **kw)
    assert graphed.cuda_graphs and graphed.warmup_seconds > 0 and not eager.cuda_graphs
    assert torch.equal(graphed.delayed, eager.delayed) and torch.equal(graphed.eos_pos, eager.eos_pos)
    # the non-blocking completion poll stops the loop within ~3 * sync_every steps of the end
    finished = int((graphed.eos_pos + model.config.data.max_delay).max()) - graphed.prefix_length + 1
    assert finished <= graphed.steps <= min(60, finished + 3 * 8)
    replay = generate_codes(model, ids, mask, engine=engine, **kw)  # reuses the captured graph
    assert replay.cuda_graphs and replay.warmup_seconds == 0.0
    assert torch.equal(replay.delayed, eager.delayed)
    plain = generate_codes(model, ids, mask, cuda_graphs=False, engine=DecodeEngine(model, static=False), **kw)
    assert plain.delayed.shape == eager.delayed.shape


@pytest.mark.gpu
def test_gpu_graph_sampling_is_reproducible_with_a_seed():
    model = _model(device="cuda").to(torch.bfloat16)
    ids, mask = encode_batch(TEXTS[:2], pad_to_multiple=128)
    engine = DecodeEngine(model)
    g = torch.Generator(device="cuda")
    runs = [
        generate_codes(model, ids, mask, max_new_tokens=60, sampling=SAMPLED, generator=g.manual_seed(9), engine=engine)
        for _ in range(2)
    ]
    assert runs[0].warmup_seconds > 0 and runs[1].warmup_seconds == 0.0  # captured, then replayed
    assert torch.equal(runs[0].delayed, runs[1].delayed)
    # sampled graph replays draw exactly what eager steps on the same buffers draw
    eager_engine = DecodeEngine(model, static=True, cuda_graphs=False)
    eager = generate_codes(
        model, ids, mask, max_new_tokens=60, sampling=SAMPLED, generator=g.manual_seed(9), engine=eager_engine
    )
    assert not eager.cuda_graphs and torch.equal(runs[0].delayed, eager.delayed)
    default = generate_codes(model, ids, mask, max_new_tokens=60, sampling=SAMPLED, engine=engine)
    assert default.cuda_graphs  # the default CUDA generator works under graphs too


@pytest.mark.gpu
def test_gpu_decode_step_never_syncs():
    model = _model(device="cuda").to(torch.bfloat16)
    samplers = {"torch", ops.select_backend("cfg_sample", model.device)}
    for sampling, sampler in [(s, b) for s in (GREEDY, SAMPLED) for b in sorted(samplers)]:
        spec = _spec(model, 2, sampler=sampler)
        bufs = allocate_buffers(model, spec, 64, 16, self_mask=True)
        _set_sampling(bufs, sampling)
        with torch.inference_mode():
            decode_step(model, spec, bufs)  # first call: lazy inits may sync
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    decode_step(model, spec, bufs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert bufs.logits.dtype == torch.bfloat16 and int(bufs.pos) == 4


def test_static_engine_sampling_follows_the_callers_generator(model):
    """The rows' Philox keys come from the caller's generator: same codes as eager for a seed, on a fresh and
    on a reused runner, and the caller's generator advances exactly as in eager mode."""
    ids, mask = encode_batch(TEXTS[:2])
    kw = dict(max_new_tokens=40, sampling=SAMPLED)
    g_eager = torch.Generator().manual_seed(21)
    eager = generate_codes(model, ids, mask, generator=g_eager, engine=DecodeEngine(model, static=False), **kw)
    engine = DecodeEngine(model, static=True)
    for _ in range(2):  # new generator objects each time: the runner is reused all the same
        g = torch.Generator().manual_seed(21)
        out = generate_codes(model, ids, mask, generator=g, engine=engine, **kw)
        assert torch.equal(out.delayed, eager.delayed) and torch.equal(out.eos_pos, eager.eos_pos)
        assert torch.equal(g.get_state(), g_eager.get_state())
    assert len(engine._entries) == 1


class _FakeEvent:
    """A copy 'in flight' until synchronize() (or the test) completes it."""

    def __init__(self) -> None:
        self.done = False

    def record(self, stream: object = None) -> None:
        pass

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_done_flag_reads_late_but_bounds_the_run_ahead():
    """The non-blocking completion poll (CUDA path, driven here with fake copy events): it never waits while at
    most `max_pending` copies are in flight, sees the flag at most `max_pending` polls late, and gives every
    pooled buffer back."""
    from dia_fast.generation.generate import _DoneFlag

    events: list[_FakeEvent] = []

    def factory() -> _FakeEvent:
        events.append(_FakeEvent())
        return events[-1]

    pool = PinnedPool(max_bytes=1 << 20, event_factory=factory)
    done = torch.zeros(1, dtype=torch.bool)
    flag = _DoneFlag(done, None, max_pending=2)
    flag.pool = pool  # what the CUDA path uses
    assert not flag.poll() and not flag.poll()  # two copies in flight, nothing waited for
    assert not any(e.done for e in events)
    assert not flag.poll()  # a third: the oldest is waited for (it read False)
    assert [e.done for e in events] == [True, False, False]
    done.fill_(True)  # the device finishes; the next copy reads True
    results = [flag.poll() for _ in range(3)]
    assert results == [False, False, True]  # seen once that copy became the oldest beyond the bound
    flag.close()
    assert pool.stats()["buffers_in_use"] == 0
    # copies that completed early are read without waiting
    flag = _DoneFlag(done, None, max_pending=4)
    flag.pool = pool
    n = len(events)
    assert not flag.poll()  # one copy queued, still in flight: not read
    events[n].done = True
    assert flag.poll()  # it completed: read at once (True) without waiting for the newer copy
    assert not events[n + 1].done
    flag.close()
    assert pool.stats()["buffers_in_use"] == 0


def test_static_runner_is_not_reused_after_the_weights_move():
    model = _model()
    engine = DecodeEngine(model, static=True)
    ids, mask = encode_batch(TEXTS[:1])
    a = generate_codes(model, ids, mask, max_new_tokens=30, sampling=GREEDY, engine=engine)
    generate_codes(model, ids, mask, max_new_tokens=30, sampling=GREEDY, engine=engine)
    assert len(engine._entries) == 1
    model.to(torch.float64).to(torch.float32)  # new parameter tensors (a captured graph would read freed memory)
    b = generate_codes(model, ids, mask, max_new_tokens=30, sampling=GREEDY, engine=engine)
    assert len(engine._entries) == 2
    assert torch.equal(a.delayed, b.delayed)


class _HostSyncDetector(TorchDispatchMode):
    """Records the aten ops that read device data back to the host (a sync on CUDA) or have data-dependent
    output shapes (which sync too, and cannot be captured in a graph)."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "item", "equal", "is_nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.strip("_") in {s.strip("_") for s in self.SYNCING}:
            self.found.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_decode_step_reads_nothing_back_to_the_host(model, sampling, monkeypatch):
    # as on CUDA: the CPU-only shortcut of the reference decode attention (it reads kv_len) off
    monkeypatch.setattr(reference, "SKIP_PAST_LENGTH_ON_CPU", False)
    spec = _spec(model, 2)
    bufs = allocate_buffers(model, spec, 32, 8, self_mask=True)
    _set_sampling(bufs, sampling)
    bufs.pos.fill_(2)
    with torch.inference_mode():
        decode_step(model, spec, bufs)  # warm (lazy init outside the check)
        with _HostSyncDetector() as det:
            for _ in range(3):
                decode_step(model, spec, bufs)
        assert det.found == []
        # positive control: what the old loop did every few steps, and a data-dependent shape
        with _HostSyncDetector() as det:
            bool(((bufs.eos_pos >= 0) & (bufs.pos - bufs.eos_pos >= 15)).all())
            bufs.out.nonzero()
        assert det.found == ["is_nonzero", "nonzero"]


# ---------------------------------------------------------------------------------------------- capture (faked CUDA)


class _FakeCuda:
    """Stand-ins for the torch.cuda calls of StepRunner._capture, logging what the capture does with them. The fake
    graph context runs the captured step eagerly (a real capture queues nothing); replay() runs it again."""

    def __init__(self, monkeypatch) -> None:
        from dia_fast.generation import engine

        self.log: list[tuple] = []
        self.graphs: list[object] = []
        fake = self

        class Stream:
            def __init__(self, device=None, name="side") -> None:
                self.device, self.name = device, name

            def wait_stream(self, other) -> None:
                fake.log.append(("wait_stream", self.name, other.name))

            def synchronize(self) -> None:
                fake.log.append(("stream_synchronize", self.name))

        class Graph:
            def __init__(self) -> None:
                self.fn = None
                fake.graphs.append(self)

            def replay(self) -> None:
                self.fn()

        @contextmanager
        def device(dev):
            fake.log.append(("device", dev))
            yield

        @contextmanager
        def stream(s):
            fake.log.append(("stream", s.name))
            yield

        @contextmanager
        def graph(g, stream=None, capture_error_mode="global"):
            fake.log.append(("graph", stream.name, capture_error_mode, engine._CAPTURE_LOCK.locked()))
            yield

        for name, value in {
            "Stream": Stream,
            "CUDAGraph": Graph,
            "device": device,
            "stream": stream,
            "graph": graph,
            "current_stream": lambda dev=None: Stream(dev, "current"),
            "synchronize": lambda dev=None: fake.log.append(("synchronize", dev)),
        }.items():
            monkeypatch.setattr(torch.cuda, name, value)
        monkeypatch.setattr(engine, "using_device", device)
        # (absent from CPU builds of torch)
        monkeypatch.setattr(
            torch._C, "_cuda_clearCublasWorkspaces", lambda: fake.log.append(("clear_workspaces",)), raising=False
        )


def test_capture_is_lazy_and_on_the_models_device(model, monkeypatch):
    """StepRunner's CUDA-graph capture with faked torch.cuda calls: nothing happens before the first prepare();
    then warm-up on a side stream, capture on that stream in thread_local mode under the process-wide capture
    lock with the model's device current. The step draws no torch random numbers: no generator to register."""
    from dia_fast.generation.engine import StepRunner

    fake = _FakeCuda(monkeypatch)
    spec = _spec(model, 2)
    bufs = allocate_buffers(model, spec, 32, 8, self_mask=True)
    _set_sampling(bufs, SAMPLED)
    bufs.pos.fill_(3)
    runner = StepRunner(model, spec, bufs, graph=True, warmup_steps=2)
    assert not fake.graphs and not fake.log and not runner.graphed  # nothing at construction
    rng = torch.get_rng_state()
    with torch.inference_mode(), runner:
        assert runner.prepare() > 0 and runner.graphed
        (g,) = fake.graphs
        assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn from torch's generators
        # cuBLAS's workspaces are dropped around the capture (the graph allocates its own in its pool), after the
        # warm-up's GEMMs are done with them; only streams are synchronized, never the whole device (another
        # thread's capture would break)
        assert fake.log == [
            ("device", model.device),
            ("wait_stream", "side", "current"),
            ("stream", "side"),  # the warm-up steps
            ("stream_synchronize", "side"),
            ("stream", "side"),  # the position put back
            ("clear_workspaces",),
            ("graph", "side", "thread_local", True),
            ("clear_workspaces",),
            ("stream_synchronize", "side"),
        ]
        # warm-up steps restart at the same position; the (fake) capture ran one more step from it
        assert int(bufs.pos) == 4
        assert runner.prepare() == 0.0 and len(fake.graphs) == 1  # captured once
        g.fn = runner._eager
        runner.step()  # replays the graph
        assert int(bufs.pos) == 5


class _ReplayEager:
    def __init__(self, fn) -> None:
        self.replay = fn


def test_concurrent_calls_share_one_capture_and_one_reports_it(model, monkeypatch):
    """Two calls of one bucket at once: one runner, one capture, and its time in the result of the call that made
    it (the other reports 0); both give the eager codes."""
    import threading
    import time

    from dia_fast.generation.engine import StepRunner

    captures: list[StepRunner] = []

    def fake_capture(self, warmup_steps: int) -> None:
        captures.append(self)
        time.sleep(0.05)  # the other call arrives while this one captures
        self.graph = _ReplayEager(self._eager)

    monkeypatch.setattr(StepRunner, "_capture", fake_capture)
    monkeypatch.setattr(DecodeEngine, "graphs_enabled", lambda self, cuda_graphs=None: self.is_static)
    ids, mask = encode_batch(TEXTS[:2])
    kw = dict(max_new_tokens=30, sampling=GREEDY)
    eager = generate_codes(model, ids, mask, engine=DecodeEngine(model, static=False), **kw)
    engine = DecodeEngine(model, static=True)
    barrier = threading.Barrier(2)
    results: list = []

    def call() -> None:
        barrier.wait()
        results.append(generate_codes(model, ids, mask, engine=engine, **kw))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and len(captures) == 1 and len(engine._entries) == 1
    assert sorted(r.warmup_seconds > 0 for r in results) == [False, True]
    assert all(r.cuda_graphs and torch.equal(r.delayed, eager.delayed) for r in results)
    again = generate_codes(model, ids, mask, engine=engine, **kw)
    assert again.cuda_graphs and again.warmup_seconds == 0.0 and len(captures) == 1


def test_min_new_tokens_holds_eos_back(early_model):
    """``min_new_tokens``: channel 0 may not emit EOS before that many positions; every item stops on its own
    without it (early_model), and at or after it with it. Out of range is an error."""
    ids, mask = encode_batch(TEXTS)
    free = generate_codes(early_model, ids, mask, max_new_tokens=80, sampling=GREEDY)
    held = generate_codes(early_model, ids, mask, max_new_tokens=80, min_new_tokens=30, sampling=GREEDY)
    P0 = free.prefix_length
    assert int((free.eos_pos - P0).max()) < 30 <= int((held.eos_pos - P0).min())
    sampled = generate_codes(
        early_model, ids, mask, max_new_tokens=80, min_new_tokens=30, sampling=SAMPLED,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert int((sampled.eos_pos - P0).min()) >= 30
    for bad in (-1, 80 - 15):
        with pytest.raises(ValueError, match="min_new_tokens"):
            generate_codes(early_model, ids, mask, max_new_tokens=80, min_new_tokens=bad, sampling=GREEDY)


def test_refused_cpu_graph_captures_are_remembered_up_to_a_bound(model, monkeypatch):
    """A long process meets many batch sizes (and backend switches): the refusals kept are bounded, oldest first."""
    from types import SimpleNamespace

    from dia_fast.generation import engine as engine_module

    monkeypatch.setattr(engine_module, "_MAX_REFUSED", 3)
    eng = DecodeEngine(model)
    for batch in range(1, 8):
        eng.remember(SimpleNamespace(spec=_spec(model, batch), cpu_step=SimpleNamespace(refused=True, note="sort")))
    assert [key[0].batch for key in eng._cpu_refused] == [5, 6, 7]

"""CPU step graphs (dia_fast.ops.cpu_graph): a recorded step replays to exactly the eager step's results, refuses
what it cannot replay (and then changes nothing), and decode loops, the static engine and the batching engine give
the same codes with and without it."""

from __future__ import annotations

import threading

import pytest
import torch

from dia_fast import _ext, ops
from dia_fast.api import DiaTTS
from dia_fast.config import DiaConfig
from dia_fast.generation.engine import DecodeEngine
from dia_fast.generation.generate import generate_codes
from dia_fast.generation.sampling import SamplingConfig
from dia_fast.model import DiaModel
from dia_fast.ops import cpp
from dia_fast.ops.cpu_graph import CaptureError, CpuGraph
from dia_fast.quantize import quantize_decoder
from dia_fast.serving import BatchEngine
from dia_fast.text import encode_batch

needs_ext = pytest.mark.skipif(not _ext.loaded(), reason="the C++ extension is not built")

TEXTS = ["[S1] Hello there. [S2] Hi!", "[S1] A longer sentence (laughs) to pad the other one.", "[S2] Third."]
GREEDY = SamplingConfig(do_sample=False)
SAMPLED = SamplingConfig(cfg_scale=3.0, temperature=1.2, top_p=0.9, cfg_filter_top_k=45)
NO_CFG = SamplingConfig(cfg_scale=0.0, temperature=1.0, top_p=1.0, cfg_filter_top_k=None)


def _model(seed: int = 0) -> DiaModel:
    """Tiny random Dia whose channel-0 EOS logit sits just above a common token's: items stop on their own."""
    torch.manual_seed(seed)
    model = DiaModel(DiaConfig.preset("tiny")).eval()
    with torch.no_grad():
        w = model.decoder.logits_dense.weight
        w[1024] = 1.05 * w[613]
    return model


@pytest.fixture(scope="module")
def model() -> DiaModel:
    return _model()


# ---------------------------------------------------------------------------------------------- the graph


@needs_ext
@torch.inference_mode()
def test_replay_reruns_kernels_and_torch_ops_on_the_same_buffers():
    """A step-like function (C++ norm and SwiGLU into fresh tensors, ``pos + 1``, a cast copy, ``+=``): its replays
    read the buffers' current contents and write the same outputs an eager call writes."""
    g = torch.Generator().manual_seed(0)
    h, d, w = (torch.randn(2, 1, 64, generator=g) for _ in range(3))
    w = w[0, 0]
    gate_up = torch.randn(2, 1, 32, generator=g)
    pos = torch.tensor([3])
    top_k = torch.tensor([5, 7], dtype=torch.int32)
    out_norm, out_h, out_act = torch.empty(2, 1, 64), torch.empty(2, 1, 64), torch.empty(2, 1, 16)
    out_len, out_k = torch.empty(1, dtype=torch.long), torch.empty(2, dtype=torch.long)

    def step() -> None:
        normed, new_h = cpp.add_rmsnorm(h, d, w, 1e-5)
        out_norm.copy_(normed)
        out_h.copy_(new_h)
        out_act.copy_(cpp.swiglu(gate_up))
        out_len.copy_(pos + 1)
        out_k.copy_(top_k.to(torch.long))
        pos.add_(1)

    graph = CpuGraph.capture(step)
    assert graph.kernel_calls == 2 and len(graph) > 2 and int(pos) == 4  # the capture ran the step
    for i in range(3):
        for t in (h, d, gate_up):
            t.copy_(torch.randn(t.shape, generator=g))
        top_k += i
        expect_norm, expect_h = ops.reference.add_rmsnorm(h, d, w, 1e-5)
        expect_len, expect_k = pos + 1, top_k.long()
        assert graph.replay()
        torch.testing.assert_close(out_norm, expect_norm, rtol=1e-5, atol=1e-6)
        assert torch.equal(out_h, expect_h)
        torch.testing.assert_close(out_act, ops.reference.swiglu(gate_up), rtol=1e-5, atol=1e-6)
        assert torch.equal(out_len, expect_len) and torch.equal(out_k, expect_k) and int(pos) == 5 + i


@torch.inference_mode()
def test_an_op_it_cannot_replay_fails_the_capture_after_running_the_function():
    x = torch.tensor([3.0, 1.0, 2.0])
    seen = []

    def sorts() -> None:
        seen.append(torch.sort(x).values)

    with pytest.raises(CaptureError, match="sort"):
        CpuGraph.capture(sorts)
    assert torch.equal(seen[0], torch.tensor([1.0, 2.0, 3.0]))

    def reads_back() -> None:
        seen.append(int(x[0]))  # a host read: a replay could not know the value

    with pytest.raises(CaptureError, match="item|_local_scalar_dense"):
        CpuGraph.capture(reads_back)
    assert seen[-1] == 3

    def draws() -> None:
        seen.append(torch.rand(2))

    with pytest.raises(CaptureError, match="uniform|rand"):
        CpuGraph.capture(draws)
    with pytest.raises(CaptureError, match="no calls"):
        CpuGraph.capture(lambda: None)


def test_the_functions_own_exception_propagates_and_captures_do_not_nest():
    def fails() -> None:
        raise KeyError("mine")

    with pytest.raises(KeyError, match="mine"):
        CpuGraph.capture(fails)

    def nested() -> None:
        torch.ones(1).add_(1)
        CpuGraph.capture(lambda: torch.ones(1).add_(1))

    with pytest.raises(CaptureError, match="already underway"):
        CpuGraph.capture(nested)


@needs_ext
@torch.inference_mode()
def test_a_kernel_error_at_replay_stops_it_and_returns_false():
    """embed_codes reports a code outside the vocabulary: the replay stops there and says so (the caller then
    runs the step eagerly, which raises the reference's IndexError)."""
    table = torch.randn(3 * 10, 8)
    codes = torch.tensor([[[1, 2, 3]]])
    out = torch.empty(1, 1, 8)
    graph = CpuGraph.capture(lambda: out.copy_(cpp.embed_codes(codes, table, 10)))
    assert graph.replay()
    codes[0, 0, 2] = 10  # row 30 of a 30-row table
    out.fill_(7.0)
    assert not graph.replay()
    assert bool((out == 7.0).all())  # stopped before the copy
    with pytest.raises(IndexError):
        cpp.embed_codes(codes, table, 10)


@needs_ext
@torch.inference_mode()
def test_a_capture_records_its_own_thread_only():
    """Another thread's kernel calls during a capture are neither recorded nor disturbed."""
    x, w = torch.randn(2, 1, 64), torch.ones(64)
    started, release = threading.Event(), threading.Event()
    other: list[torch.Tensor] = []

    def step() -> None:
        cpp.add_rmsnorm(x, None, w, 1e-5)
        started.set()
        assert release.wait(30)
        cpp.add_rmsnorm(x, None, w, 1e-5)

    def elsewhere() -> None:
        assert started.wait(30)
        other.extend(cpp.swiglu(torch.randn(2, 1, 32)) for _ in range(5))
        release.set()

    t = threading.Thread(target=elsewhere)
    t.start()
    graph = CpuGraph.capture(step)
    t.join(30)
    assert graph.kernel_calls == 2 and len(other) == 5


# ---------------------------------------------------------------------------------------------- decode loops


def _generate(model, sampling, *, graphs, texts=TEXTS, prompts=None, engine=None, max_new_tokens=50):
    ids, mask = encode_batch(texts)
    gen = torch.Generator().manual_seed(4)
    return generate_codes(
        model, ids, mask, prompts=prompts, max_new_tokens=max_new_tokens, sampling=sampling, generator=gen,
        cpu_graphs=graphs, engine=engine, progress=False,
    )  # fmt: skip


@needs_ext
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED, NO_CFG], ids=["greedy", "sampled", "no-cfg"])
def test_generation_with_a_cpu_graph_equals_eager_steps(model, sampling):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 1024, (6, 9), generator=g), None, torch.randint(0, 1024, (2, 9), generator=g)]
    eager = _generate(model, sampling, graphs=False, prompts=prompts)
    graphed = _generate(model, sampling, graphs=True, prompts=prompts)
    assert not eager.cpu_graph and eager.cpu_graph_note == "off"
    assert graphed.cpu_graph and graphed.cpu_graph_note == "" and graphed.steps == eager.steps
    assert torch.equal(graphed.delayed, eager.delayed) and torch.equal(graphed.eos_pos, eager.eos_pos)


@needs_ext
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_replays_its_step_too(mode):
    qmodel = _model()
    quantize_decoder(qmodel, mode)
    eager = _generate(qmodel, SAMPLED, graphs=False)
    graphed = _generate(qmodel, SAMPLED, graphs=None)  # the default
    assert graphed.cpu_graph
    assert torch.equal(graphed.delayed, eager.delayed) and torch.equal(graphed.eos_pos, eager.eos_pos)


def test_a_step_on_the_reference_ops_stays_eager_and_says_why(model, monkeypatch):
    """A refused step says why; the engine remembers it, so later calls with that step and those weights step
    eagerly at once instead of paying for a capture that would be refused again."""
    eager = _generate(model, GREEDY, graphs=False)
    engine = DecodeEngine(model)
    ops.set_backend("torch")
    try:
        out = _generate(model, GREEDY, graphs=True, engine=engine)
        captures = []
        real_capture = CpuGraph.capture
        monkeypatch.setattr(CpuGraph, "capture", classmethod(lambda cls, fn: captures.append(1) or real_capture(fn)))
        again = _generate(model, GREEDY, graphs=True, engine=engine)
    finally:
        ops.set_backend(None)
    assert not out.cpu_graph and "which a CPU graph does not replay" in out.cpu_graph_note
    assert torch.equal(out.delayed, eager.delayed)
    assert not captures and again.cpu_graph_note == out.cpu_graph_note and torch.equal(again.delayed, eager.delayed)
    if _ext.loaded():  # back on the C++ ops (a new dispatch generation): captured again
        replayed = _generate(model, GREEDY, graphs=True, engine=engine)
        assert captures and replayed.cpu_graph


@needs_ext
def test_a_static_runner_keeps_its_graph_across_calls_until_the_backends_change(model):
    engine = DecodeEngine(model, static=True)
    first = _generate(model, SAMPLED, graphs=None, engine=engine)
    (runner,) = engine._entries.values()
    graph = runner.cpu_graph
    assert first.cpu_graph and graph is not None
    again = _generate(model, GREEDY, graphs=None, engine=engine, texts=TEXTS[1:] + TEXTS[:1])
    assert runner.cpu_graph is graph and len(engine._entries) == 1  # replayed from the first step on
    ref = _generate(model, GREEDY, graphs=False, texts=TEXTS[1:] + TEXTS[:1])
    assert torch.equal(again.delayed, ref.delayed)
    ops.set_backend("torch", "swiglu")
    try:
        _generate(model, GREEDY, graphs=None, engine=engine)
    finally:
        ops.set_backend(None, "swiglu")
    assert len(engine._entries) == 2  # a new runner: the old graph calls the C++ SwiGLU


@needs_ext
def test_a_replay_that_reports_an_error_drops_the_graph_and_steps_eagerly(model, monkeypatch):
    """As when a kernel reports an error at its first recorded call (nothing of the step ran): the runner runs that
    step eagerly and every later one, and the codes are those of eager steps."""
    eager = _generate(model, SAMPLED, graphs=False)
    replays: list[int] = []

    def first_call_fails(self: CpuGraph) -> bool:
        replays.append(1)
        return False

    monkeypatch.setattr(CpuGraph, "replay", first_call_fails)
    out = _generate(model, SAMPLED, graphs=True)
    assert len(replays) == 1 and not out.cpu_graph and out.cpu_graph_note.startswith("dropped")
    assert torch.equal(out.delayed, eager.delayed)


@needs_ext
def test_the_batching_engine_replays_one_graph_per_bucket_with_the_same_codes(model):
    """Requests of different lengths and settings joining and leaving: the same codes with CPU graphs as without."""
    tts = DiaTTS(model, DiaTTS.random("tiny").codec)
    reqs = [
        dict(text=t + " More." * i, max_new_tokens=30 + 9 * i, seed=10 + i, **({"do_sample": False} if i % 2 else {}))
        for i, t in enumerate(TEXTS * 2)
    ]
    codes = {}
    for graphs in (False, True):
        with BatchEngine(tts, max_slots=4, cpu_graphs=graphs) as engine:
            handles = [engine.submit(**r) for r in reqs]
            codes[graphs] = [h.result(120, decode_audio=False).codes for h in handles]
            replayed, notes = engine.cpu_graphed_buckets, engine.cpu_graph_notes
        if graphs:
            assert replayed and notes == {}
        else:
            assert replayed == [] and notes and set(notes.values()) == {"off"}
    for eager, graphed in zip(codes[False], codes[True], strict=True):
        assert torch.equal(eager, graphed)

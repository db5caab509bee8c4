"""The launch budget of a decode step at Dia-1.6B widths: at most 16 launches per decoder layer and 40 outside the
layers (non-view aten ops + Triton launches), on the GPU's code path (the Triton backend; on a CPU-only machine
its kernels run in the interpreter, and the count is the same: nothing in a step depends on data)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dia_fast import ops  # noqa: E402
from dia_fast.bench.launches import LaunchCounter, count_decode_launches  # noqa: E402
from dia_fast.config import DiaConfig  # noqa: E402
from dia_fast.generation.sampling import SamplingConfig  # noqa: E402
from dia_fast.model import DiaModel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PER_LAYER, OUTSIDE = 16, 40


def _model(decoder_layers: int) -> DiaModel:
    """Dia-1.6B widths, one encoder layer, bf16 random weights (the count needs shapes, not values)."""
    with torch.device("meta"):
        model = DiaModel(DiaConfig.preset("dia-1.6b").with_layers(1, decoder_layers))
    model.to_empty(device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model.to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def triton_backend():
    ops.set_backend("triton")
    yield
    ops.set_backend(None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch,sampling",
    [(1, SamplingConfig(do_sample=False)), (2, SamplingConfig()), (1, SamplingConfig(cfg_scale=0.0))],
    ids=["greedy-b1", "sampled-b2", "no-cfg-b1"],
)
def test_decode_step_launch_budget(triton_backend, batch: int, sampling: SamplingConfig) -> None:
    one, two = _model(1), _model(2)
    c1 = count_decode_launches(one, batch=batch, steps=1, sampling=sampling)
    c2 = count_decode_launches(two, batch=batch, steps=1, sampling=sampling)
    assert c2.per_layer <= PER_LAYER, c2.by_op
    assert c2.outside_layers <= OUTSIDE, c2.by_op
    # the way of counting: difference over 1 vs 2 layers = what the layer hooks saw
    assert c2.per_step - c1.per_step == c2.per_layer == c1.per_layer
    assert c1.outside_layers == c2.outside_layers
    # every hot op of the step is a Triton kernel: the only aten ops left are the GEMMs and two position updates
    triton = {k: v for k, v in c2.by_op.items() if not k.startswith("aten::")}
    aten = {k: v for k, v in c2.by_op.items() if k.startswith("aten::")}
    # per layer: 3 add+norm, RoPE + cache write, self and cross attention, SwiGLU; outside: the embedding, the
    # sampler, the bookkeeping and the final add+norm
    assert triton == {
        "_add_rmsnorm_kernel": 3 * 2 + 1,
        "_rope_kv_write_kernel": 2,
        "_decode_kernel": 2 * 2,
        "_swiglu_kernel": 2,
        "_embed_kernel": 1,
        "_cfg_sample_kernel": 1,
        "_step_update_kernel": 1,
    }
    gemms = sum(v for k, v in aten.items() if k in ("aten::linear", "aten::mm", "aten::matmul", "aten::addmm"))
    assert gemms == 6 * 2 + 1  # qkv, o, cross q, cross o, gate_up, down per layer + the logits
    assert sum(aten.values()) - gemms <= 2, aten  # pos + 1 and pos += 1: no casts, no copies of the logits


def test_counter_counts_ops_views_and_triton_launches() -> None:
    """The counter itself: views and allocations are not launches; ops and Triton kernel launches are."""
    from dia_fast.ops import triton_fused

    x = torch.randn(4, 8, device=DEVICE)
    with LaunchCounter() as c:
        y = x.view(8, 4).t()  # views
        z = torch.empty(3, device=DEVICE)  # an allocation
        y = y + 1  # 1 op
        x.mul_(2)  # 1 op
        triton_fused.swiglu(x)  # 1 Triton launch (its output allocation is not one)
    assert sum(c.aten.values()) == 2 and dict(c.triton) == {"_swiglu_kernel": 1}
    assert c.total == 3 and z.shape == (3,)

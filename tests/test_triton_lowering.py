"""The attention kernels compile for a GPU target (sm_90) on a machine without one.

The interpreter runs kernels as Python and misses errors only Triton's compiler reports
(constexpr misuse, type errors, integer arguments equal to 1 that become constants). This runs
the compiler's front end (AST -> Triton IR) on the variants the launchers use at Dia's shapes.
"""

from __future__ import annotations

import pytest

from dia_fast.ops import triton_attention as ta

from .triton_lowering import lower_for_cuda

STRIDES_PREFILL = [f"s{t}{a}" for t in ("q", "k", "v", "o") for a in ("b", "h", "m" if t in "qo" else "n", "d")]


def _prefill_case(dtype: str, head_dim: int, block_d: int, causal: bool, has_mask: bool, ones: bool):
    types = {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")}
    types["KM"] = "*u8"
    types.update({n: "i32" for n in (*STRIDES_PREFILL, "skmb", "skmn", "Hq", "Tq", "Tk")})
    types["qk_scale"] = "fp32"
    constexprs: dict[str, object] = dict(
        GROUP=4, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=128 if dtype != "fp32" else 32,
        BLOCK_N=64 if dtype != "fp32" else 32, CAUSAL=causal, HAS_MASK=has_mask, PREC="ieee",
    )  # fmt: skip
    if ones:  # contiguous head dim (stride 1) and one query row: Triton specialises ints equal to 1
        for n in ("sqd", "skd", "svd", "sod", "skmn", "Tq"):
            types.pop(n)
            constexprs[n] = 1
    return (ta.__name__, "_attn_fwd_kernel", types, constexprs)


def _decode_case(dtype: str, kvlen_mode: int, has_mask: bool, direct: bool, group: int, ones: bool):
    types = {n: f"*{dtype}" for n in ("Q", "K", "V", "Out")}
    types.update(KM="*u8", KVLEN="*i64", PO="*fp32", PM="*fp32", PL="*fp32", qk_scale="fp32")
    ints = ("sqb", "sqh", "sqd", "skb", "skh", "skn", "skd", "svb", "svh", "svn", "svd", "skmb", "skmn")
    ints += ("skvl", "kv_len_int", "sob", "soh", "sod", "Hq", "L", "n_splits")
    types.update({n: "i32" for n in ints})
    constexprs: dict[str, object] = dict(
        GROUP=group, BLOCK_G=max(16, group), HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64,
        KVLEN_MODE=kvlen_mode, HAS_MASK=has_mask, DIRECT=direct, PREC="ieee",
    )  # fmt: skip
    if ones:
        for n in ("sqd", "skd", "svd", "sod", "skmn", "n_splits" if direct else "skvl"):
            types.pop(n)
            constexprs[n] = 1
    return (ta.__name__, "_decode_split_kernel", types, constexprs)


def _reduce_case(head_dim: int, block_s: int):
    types = {"PO": "*fp32", "PM": "*fp32", "PL": "*fp32", "Out": "*bf16"}
    types.update({n: "i32" for n in ("sob", "soh", "sod", "Hq", "n_splits")})
    return (ta.__name__, "_decode_reduce_kernel", types, dict(HEAD_DIM=head_dim, BLOCK_D=128, BLOCK_S=block_s))


@pytest.mark.slow
def test_attention_kernels_lower_for_cuda() -> None:
    cases = []
    for dtype in ("bf16", "fp16", "fp32"):
        for causal, has_mask in ((False, True), (True, False), (True, True), (False, False)):
            cases.append(_prefill_case(dtype, 128, 128, causal, has_mask, ones=False))
        cases.append(_prefill_case(dtype, 80, 128, True, True, ones=True))  # padded head dim
        for mode in (0, 1, 2):
            for direct in (True, False):
                cases.append(_decode_case(dtype, mode, has_mask=mode != 1, direct=direct, group=4, ones=False))
        cases.append(_decode_case(dtype, 2, has_mask=True, direct=False, group=1, ones=True))  # cross-attention
    for block_s in (2, 16, 64):
        cases.append(_reduce_case(128, block_s))
    assert lower_for_cuda(cases) == len(cases)

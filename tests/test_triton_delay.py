"""Triton delay / revert / undelay and code-embedding kernels against the PyTorch references.

On a CPU-only machine the kernels run in the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1); on a CUDA machine the same tests run on the GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import dia_fast.ops as ops  # noqa: E402
from dia_fast.ops import reference as ref  # noqa: E402
from dia_fast.ops import triton_delay as td  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIA_PATTERN = [0, 8, 9, 10, 11, 12, 13, 14, 15]
BOS, PAD = 1026, -1


def _patterns(C: int, T: int, gen: torch.Generator) -> list[list[int]]:
    """Dia's pattern (C = 9), zeros, a random one and one whose delays exceed T."""
    pats = [[0] * C, torch.randint(0, 20, (C,), generator=gen).tolist()]
    if C == 9:
        pats.append(DIA_PATTERN)
    big = [T + 3 * c for c in range(C)]
    big[0] = 0
    pats.append(big)
    return pats


def _codes(B: int, T: int, C: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # values cover the specials and negatives so undelay's clean-up is exercised
    return torch.randint(-2, 1030, (B, T, C), generator=gen, dtype=torch.int64).to(dtype).to(DEVICE)


def _check_all(codes: torch.Tensor, pattern: list[int]) -> None:
    got = td.apply_delay(codes, pattern, BOS, PAD)
    want = ref.apply_delay(codes, pattern, BOS, PAD)
    assert got.dtype == codes.dtype and got.shape == want.shape
    assert torch.equal(got, want), ("apply", tuple(codes.shape), pattern)
    got = td.revert_delay(codes, pattern)
    want = ref.revert_delay(codes, pattern)
    assert got.dtype == codes.dtype
    assert torch.equal(got, want), ("revert", tuple(codes.shape), pattern)
    got = td.undelay_codes(codes, pattern, 1024)
    want = ref.undelay_codes(codes, pattern, 1024)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want), ("undelay", tuple(codes.shape), pattern)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("T", [1, 2, 7, 15, 16, 17, 100])
def test_delay_ops_match_reference(T: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1000 * T + (dtype == torch.int32))
    for C in (1, 4, 9):
        for B in (1, 2, 3, 5):
            for pattern in _patterns(C, T, gen):
                _check_all(_codes(B, T, C, dtype, gen), pattern)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_delay_ops_small_tiles(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """Many programs along T with a ragged last tile (the GPU's tiling is bigger than any T above)."""
    monkeypatch.setattr(td, "_TILE", 64)  # 4 frames of 16 (padded) channels per program
    gen = torch.Generator().manual_seed(17)
    for B, T in ((1, 1), (2, 15), (3, 37)):
        for pattern in _patterns(9, T, gen):
            _check_all(_codes(B, T, 9, dtype, gen), pattern)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_delay_ops_non_contiguous(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    # channel-major buffer viewed as [B, T, C] (the decoder's layout), a strided slice, a broadcast
    channel_major = _codes(3, 9, 23, dtype, gen).transpose(1, 2)  # [3, 23, 9], strides (207, 1, 23)
    sliced = _codes(4, 40, 9, dtype, gen)[:, 3::2]  # [4, 19, 9]
    broadcast = _codes(1, 17, 9, dtype, gen).expand(5, 17, 9)
    for codes in (channel_major, sliced, broadcast):
        assert not codes.is_contiguous()
        _check_all(codes, DIA_PATTERN)
        _check_all(codes, [0, 1, 2, 3, 4, 5, 6, 7, 30])


def test_delay_round_trip_and_dispatch() -> None:
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 1024, (2, 50, 9), generator=gen).to(DEVICE)
    delayed = ops.apply_delay(codes, DIA_PATTERN, BOS, PAD, backend="triton")
    assert torch.equal(delayed[:, :8, 1:], torch.full_like(delayed[:, :8, 1:], BOS))
    assert torch.equal(delayed[:, :, 0], codes[:, :, 0])
    # revert + drop max(delay) gives back the first T - 15 frames
    back = ops.undelay_codes(delayed, DIA_PATTERN, backend="triton")
    assert torch.equal(back, codes[:, :35])
    assert torch.equal(ops.revert_delay(delayed, DIA_PATTERN, backend="triton")[:, :35], codes[:, :35])


def test_undelay_shorter_than_max_delay() -> None:
    codes = torch.arange(2 * 5 * 9, device=DEVICE).reshape(2, 5, 9)
    out = td.undelay_codes(codes, DIA_PATTERN)
    assert out.shape == (2, 0, 9) and out.dtype == torch.int64
    out = td.undelay_codes(codes.int(), [0, 1, 2, 3, 4, 4, 4, 4, 4], codebook_size=50)
    assert torch.equal(out, ref.undelay_codes(codes, [0, 1, 2, 3, 4, 4, 4, 4, 4], 50))
    assert out.shape == (2, 1, 9)


def test_delay_pattern_forms_and_cache() -> None:
    codes = torch.randint(0, 1024, (2, 20, 9)).to(DEVICE)
    want = ref.apply_delay(codes, DIA_PATTERN, BOS, PAD)
    assert torch.equal(td.apply_delay(codes, torch.tensor(DIA_PATTERN), BOS, PAD), want)
    assert torch.equal(td.apply_delay(codes, tuple(DIA_PATTERN), BOS, PAD), want)
    # one device tensor per (pattern, device), whatever form the pattern came in
    d1, m1 = td._pattern(DIA_PATTERN, 9, codes.device)
    d2, m2 = td._pattern(torch.tensor(DIA_PATTERN), 9, codes.device)
    assert d1 is d2 and m1 == m2 == 15
    assert d1.device == codes.device and d1.tolist() == DIA_PATTERN


def test_delay_pattern_errors() -> None:
    codes = torch.zeros(1, 4, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="3 channels"):
        td.apply_delay(codes, [0, 1], BOS, PAD)
    with pytest.raises(ValueError, match="non-negative"):
        td.revert_delay(codes, [0, -1, 2])
    with pytest.raises(ValueError, match=r"\[B, T, C\]"):
        td.undelay_codes(codes[0], [0, 1, 2])


# --- embed_codes ------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [48, 300])
def test_embed_codes_fp32(D: int) -> None:
    gen = torch.Generator().manual_seed(D)
    C, V = 9, 21
    table = torch.randn(C * V, D, generator=gen).to(DEVICE)
    codes = torch.randint(0, V, (3, 7, C), generator=gen).to(DEVICE)
    got = td.embed_codes(codes, table, V)
    assert got.shape == (3, 7, D) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref.embed_codes(codes, table, V), atol=1e-5, rtol=1e-5)
    # int32 codes, channel-major (non-contiguous) codes, a transposed (non-contiguous) table
    codes_cm = codes.transpose(1, 2).contiguous().transpose(1, 2).int()
    table_t = table.t().contiguous().t()
    got = ops.embed_codes(codes_cm, table_t, V, backend="triton")
    torch.testing.assert_close(got, ref.embed_codes(codes, table, V), atol=1e-5, rtol=1e-5)


def test_embed_codes_fp16_single_channel_and_one_frame() -> None:
    gen = torch.Generator().manual_seed(11)
    for C, T in ((9, 1), (1, 5), (4, 3)):
        V, D = 1028, 64
        table = (torch.randn(C * V, D, generator=gen) * 0.5).half().to(DEVICE)
        codes = torch.randint(0, V, (2, T, C), generator=gen).to(DEVICE)
        got = td.embed_codes(codes, table, V)
        assert got.dtype == torch.float16
        # fp32 accumulation then one rounding: within one fp16 ulp of the fp32 sum
        want = ref.embed_codes(codes, table.float(), V)
        torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embed_delayed_codes(dtype: torch.dtype) -> None:
    """The fused delay + embedding equals embed_codes(apply_delay(codes)) over ragged shapes."""
    gen = torch.Generator().manual_seed(21 + (dtype == torch.float16))
    V, D = 1028, 40
    # (C, B, T, patterns): T = 1, T < max delay, ragged T; delays beyond T; one channel
    cases = [
        (9, 1, 1, [DIA_PATTERN]),
        (9, 2, 7, [DIA_PATTERN, [0, 1, 2, 3, 4, 5, 6, 7, 30]]),
        (9, 5, 19, [DIA_PATTERN]),
        (3, 3, 4, [[2, 0, 9]]),
        (1, 2, 6, [[3]]),
    ]
    for C, B, T, patterns in cases:
        table = (torch.randn(C * V, D, generator=gen) * 0.5).to(dtype).to(DEVICE)
        codes = torch.randint(0, 1024, (B, T, C), generator=gen).to(DEVICE)
        for pattern in patterns:
            got = td.embed_delayed_codes(codes, pattern, BOS, 1025, table, V)
            assert got.dtype == dtype and got.shape == (B, T, D)
            want = ref.embed_codes(ref.apply_delay(codes, pattern, BOS, 1025), table.float(), V)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_embed_tables_past_the_kernel_run_the_reference() -> None:
    """A table with fewer than C * vocab_size rows: the kernel would read past its end (any in-vocabulary code is
    read unchecked), so it runs the reference, whose IndexError is the op's; codes inside the table get the
    reference's sums. fp64 tables (the kernel sums in fp32) run the reference too."""
    store = torch.arange(40.0).reshape(10, 4).to(DEVICE)
    table = store[:5]  # 2 channels x vocabulary 4 need 8 rows
    past = torch.tensor([[[3, 3]]], device=DEVICE)  # channel 1, code 3: row 7
    with pytest.raises(IndexError):
        td.embed_codes(past, table, 4)
    with pytest.raises(IndexError):
        td.embed_delayed_codes(past, [0, 0], 1, 2, table, 4)
    inside = torch.tensor([[[3, 0], [1, 0]]], device=DEVICE)  # rows 3 + 4, 1 + 4
    assert torch.equal(td.embed_codes(inside, table, 4), ref.embed_codes(inside, table, 4))
    want = ref.embed_codes(ref.apply_delay(inside, [0, 1], 0, 0), table, 4)
    assert torch.equal(td.embed_delayed_codes(inside, [0, 1], 0, 0, table, 4), want)
    gen = torch.Generator().manual_seed(64)
    table64 = torch.randn(3 * 7, 5, generator=gen, dtype=torch.float64).to(DEVICE)
    codes = torch.randint(0, 7, (2, 4, 3), generator=gen).to(DEVICE)
    assert torch.equal(td.embed_codes(codes, table64, 7), ref.embed_codes(codes, table64, 7))


@pytest.mark.gpu
def test_embed_codes_bf16_gpu() -> None:
    gen = torch.Generator().manual_seed(5)
    C, V, D = 9, 1028, 2048
    table = torch.randn(C * V, D, generator=gen).bfloat16().cuda()
    codes = torch.randint(0, V, (2, 3, C), generator=gen).cuda()
    got = td.embed_codes(codes, table, V)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.embed_codes(codes, table.float(), V), atol=0.05, rtol=1e-2)
    got = td.embed_delayed_codes(codes, DIA_PATTERN, BOS, 1025, table, V)
    want = ref.embed_codes(ref.apply_delay(codes, DIA_PATTERN, BOS, 1025), table.float(), V)
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=1e-2)


@pytest.mark.gpu
def test_delay_ops_large_gpu() -> None:
    gen = torch.Generator().manual_seed(9)
    codes = torch.randint(-1, 1027, (8, 3072, 9), generator=gen).cuda()
    _check_all(codes, DIA_PATTERN)
    _check_all(codes.int(), DIA_PATTERN)

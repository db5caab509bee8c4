"""The C++ CPU kernels (dia_fast._C through dia_fast.ops.cpp) against the PyTorch / numpy references.

When the source tree has no built extension, the module fixture builds one in place with CMake
(``build/inplace``, ~15 s) and copies it next to the Python package, like an editable install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import dia_fast
from dia_fast import _ext, ops
from dia_fast.ops import reference

ROOT = Path(__file__).resolve().parents[1]
DIA_DELAYS = [0, 8, 9, 10, 11, 12, 13, 14, 15]


def build_inplace() -> str:
    """Build dia_fast._C from csrc/ into python/dia_fast/ and reload it; '' on success, else why not."""
    pkg = Path(dia_fast.__file__).resolve().parent
    if pkg != ROOT / "python" / "dia_fast":
        return f"dia_fast is imported from {pkg}, not from this source tree"
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    import pybind11

    build = ROOT / "build" / "inplace"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = [
        "cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DIA_FAST_NO_EXT"}
    for cmd in (cfg, ["cmake", "--build", str(build), "-j", "2"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            return f"{' '.join(cmd[:2])} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    # copy, then rename over: a new inode, so processes that have the old library mapped keep it intact
    tmp = pkg / f"_C{suffix}.tmp"
    shutil.copy2(build / f"_C{suffix}", tmp)
    os.replace(tmp, pkg / f"_C{suffix}")
    return "" if _ext.reload() else _ext.why_not()


@pytest.fixture(scope="module", autouse=True)
def ext():
    if os.environ.get("DIA_FAST_DISABLE_EXT") == "1":
        pytest.skip("DIA_FAST_DISABLE_EXT=1")
    if not _ext.loaded():
        if Path(dia_fast.__file__).resolve().parent != ROOT / "python" / "dia_fast":
            pytest.skip(f"installed dia_fast without its extension: {_ext.why_not()}")
        why = build_inplace()
        if why:
            pytest.fail(f"could not build the extension in place: {why}")
    return _ext.module()


# --- delay / undelay --------------------------------------------------------------------------

SHAPES = [(1, 1, 1), (1, 5, 9), (2, 16, 9), (3, 37, 9), (2, 3, 4), (1, 0, 9), (4, 129, 3)]


def _pattern(C: int) -> list[int]:
    return DIA_DELAYS if C == 9 else [int(d) for d in torch.randint(0, 7, (C,))]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_delay_ops_match_reference(shape, dtype):
    codes = torch.randint(-3, 1030, shape, dtype=dtype)
    pattern = _pattern(shape[2])
    got = ops.apply_delay(codes, pattern, 1026, 1025, backend="cpp")
    assert got.dtype == dtype
    assert torch.equal(got, reference.apply_delay(codes, pattern, 1026, 1025))
    got = ops.revert_delay(codes, pattern, backend="cpp")
    assert torch.equal(got, reference.revert_delay(codes, pattern))
    got = ops.undelay_codes(codes, pattern, 1024, backend="cpp")
    want = reference.undelay_codes(codes, pattern, 1024)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want)


def test_delay_roundtrip_and_views():
    codes = torch.randint(0, 1024, (2, 40, 9))
    delayed = ops.apply_delay(codes, DIA_DELAYS, 1026, 1025, backend="cpp")
    assert torch.equal(ops.undelay_codes(delayed, DIA_DELAYS, backend="cpp")[:, :25], codes[:, :25])
    # non-contiguous input and a delay tensor instead of a list
    view = torch.randint(0, 1024, (2, 9, 30)).transpose(1, 2)
    d = torch.tensor(DIA_DELAYS)
    assert torch.equal(ops.apply_delay(view, d, 7, 8, backend="cpp"), reference.apply_delay(view, d, 7, 8))


def test_delay_validation_and_fallback():
    codes = torch.randint(0, 10, (1, 5, 3))
    with pytest.raises(ValueError):
        ops.apply_delay(codes, [0, 1], 0, 0, backend="cpp")
    with pytest.raises(ValueError):
        ops.revert_delay(codes, [0, -1, 2], backend="cpp")
    small = codes.to(torch.int16)  # not a kernel dtype: the wrapper runs the reference
    assert torch.equal(
        ops.apply_delay(small, [0, 1, 2], 3, 4, backend="cpp"), reference.apply_delay(small, [0, 1, 2], 3, 4)
    )
    for bos, pad in ((2**31, 0), (0, -(2**31) - 1)):  # values int32 cannot hold: the reference's error, no wrap
        with pytest.raises(RuntimeError, match="overflow"):
            ops.apply_delay(codes.int(), [0, 1, 2], bos, pad, backend="cpp")


def test_extension_rejects_bad_buffers(ext):
    codes = np.zeros((1, 4, 3), dtype=np.int64)
    delays = np.array([0, 1, 2], dtype=np.int64)
    with pytest.raises(ValueError, match="overlaps"):
        ext.revert_delay(codes, delays, codes)
    with pytest.raises(TypeError):
        ext.revert_delay(codes, delays, np.zeros((1, 4, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="shape"):
        ext.revert_delay(codes, delays, np.zeros((1, 4, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="non-negative"):
        ext.revert_delay(codes, np.array([0, -1, 2]), np.zeros_like(codes))
    ro = np.zeros_like(codes)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        ext.revert_delay(codes, delays, ro)


# --- CFG sampling -----------------------------------------------------------------------------


def _logits(B: int, C: int, V: int, eos: int, *, force_eos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.randn(2 * B, C, V) * 3
    if force_eos:
        both[0, 0, eos] = 50.0  # batch row 0, channel 0: EOS is the argmax -> only candidate
    return both[:B], both[B:]  # views into one [2B, C, V] buffer, as the generation loop passes them


@pytest.mark.parametrize("B,C,V", [(1, 9, 1028), (3, 9, 1028), (8, 9, 1028), (2, 4, 37), (1, 2, 5)])
@pytest.mark.parametrize("top_k", [None, 1, 4, 45, 10_000])
def test_cfg_sample_greedy_exact(B, C, V, top_k):
    eos = V - 4 if V > 8 else V - 1
    for force in (False, True):
        cond, uncond = _logits(B, C, V, eos, force_eos=force)
        kw = dict(cfg_scale=3.0, top_k=top_k, eos_id=eos, do_sample=False)
        want = reference.cfg_sample(cond, uncond, **kw)
        got = ops.cfg_sample(cond, uncond, backend="cpp", **kw)
        assert got.dtype == torch.int64 and got.shape == (B, C)
        assert torch.equal(got, want)
        # temperature 0 is greedy too
        kw.update(do_sample=True, temperature=0.0)
        assert torch.equal(ops.cfg_sample(cond, uncond, backend="cpp", **kw), want)


def _support(cond, uncond, *, temperature, top_p, top_k, eos_id, cfg_scale=3.0) -> torch.Tensor:
    logits = reference.filter_cfg_logits(cond, uncond, cfg_scale=cfg_scale, top_k=top_k, eos_id=eos_id)
    return reference.top_p_filter(logits / temperature, top_p).softmax(-1)


def test_cfg_sample_reproducible_and_in_support():
    cond, uncond = _logits(4, 9, 1028, 1024, force_eos=True)
    kw = dict(temperature=1.2, top_p=0.95, top_k=45, eos_id=1024)
    a = ops.cfg_sample(cond, uncond, generator=torch.Generator().manual_seed(7), backend="cpp", **kw)
    b = ops.cfg_sample(cond, uncond, generator=torch.Generator().manual_seed(7), backend="cpp", **kw)
    assert torch.equal(a, b)
    probs = _support(cond, uncond, **kw)
    assert bool((probs.gather(-1, a[..., None]) > 0).all())
    assert int(a[0, 0]) == 1024  # EOS forced on row 0, channel 0
    draws = torch.stack([ops.cfg_sample(cond, uncond, backend="cpp", **kw) for _ in range(20)])
    assert len(torch.unique(draws[:, 1, 3])) > 1  # really sampling, not greedy


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    expected = probs * n
    stat = float(((counts - expected) ** 2 / expected).sum())
    dof = probs.numel() - 1
    return float(1 - torch.distributions.Chi2(torch.tensor(float(dof))).cdf(torch.tensor(stat)))


@pytest.mark.parametrize("top_k,top_p,temperature", [(None, 1.0, 1.0), (6, 0.8, 1.3), (None, 0.9, 0.7)])
def test_cfg_sample_distribution_chi_square(top_k, top_p, temperature):
    V, eos, rows = 12, 11, 4001
    base_c = torch.randn(V) * 1.5
    base_u = base_c + 0.3 * torch.randn(V)  # without a top-k the guided logits are sampled: keep them tame
    # one channel-0 row (EOS rules) and 4000 identical rows of channels >= 1: 4000 draws per call
    cond = base_c.expand(1, rows, V).contiguous()
    uncond = base_u.expand(1, rows, V).contiguous()
    kw = dict(temperature=temperature, top_p=top_p, top_k=top_k, eos_id=eos, cfg_scale=2.0)
    probs = _support(cond[:, 1:2], uncond[:, 1:2], **kw)[0, 0].double()
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(V, dtype=torch.float64)
    for _ in range(5):
        codes = ops.cfg_sample(cond, uncond, generator=gen, backend="cpp", **kw)
        counts += torch.bincount(codes[0, 1:], minlength=V).double()
    assert float(counts[probs == 0].sum()) == 0  # nothing outside the filtered support
    keep = probs > 0
    assert int(keep.sum()) >= 2
    assert _chi2_pvalue(counts[keep], probs[keep]) > 1e-3


def test_cfg_sample_args(ext):
    cond, uncond = _logits(1, 9, 64, 60)
    with pytest.raises(ValueError):
        ops.cfg_sample(cond, uncond, eos_id=64, backend="cpp")
    # half-precision logits are upcast like the reference does
    want = reference.cfg_sample(cond.half(), uncond.half(), eos_id=60, do_sample=False)
    assert torch.equal(ops.cfg_sample(cond.half(), uncond.half(), eos_id=60, do_sample=False, backend="cpp"), want)
    out = np.empty((1, 9), dtype=np.int64)
    with pytest.raises(ValueError, match="shape"):
        ext.cfg_sample(cond.numpy(), uncond.numpy(), out, 3.0, 1.0, 1.0, 0, 60, np.zeros(3, dtype=np.float32))


def test_cfg_sample_edge_inputs_as_the_reference(ext):
    """Without a seed: a negative temperature is greedy (not a flipped distribution), an empty batch is an empty
    result; a NaN logit is picked as torch's argmax picks it (the first NaN), greedy or seeded."""
    cond, uncond = _logits(2, 9, 64, 61)
    greedy = reference.cfg_sample(cond, uncond, eos_id=60, do_sample=False)
    for temperature in (-1.0, -1e-3, 0.0):
        kw = dict(eos_id=60, temperature=temperature, generator=torch.Generator(), backend="cpp")
        got = ops.cfg_sample(cond, uncond, **kw)
        assert torch.equal(got, greedy), temperature
    empty = cond[:0]
    for kw in (dict(generator=torch.Generator()), dict(do_sample=False), dict(seed=torch.zeros(0, dtype=torch.long))):
        assert ops.cfg_sample(empty, empty, eos_id=60, backend="cpp", **kw).shape == (0, 9)
    cond = cond.clone()
    cond[0, 1, 5] = cond[1, 2, 7] = cond[1, 2, 9] = float("nan")
    for kw in (dict(do_sample=False), dict(seed=torch.tensor([1, 2])), dict(seed=torch.tensor([3, 4]), top_k=None)):
        want = reference.cfg_sample(cond, uncond, eos_id=60, **kw)
        assert want[0, 1] == 5 and want[1, 2] == 7
        assert torch.equal(ops.cfg_sample(cond, uncond, eos_id=60, backend="cpp", **kw), want), kw
    got = ops.cfg_sample(cond, uncond, eos_id=60, generator=torch.Generator().manual_seed(0), backend="cpp")
    assert got[0, 1] == 5 and got[1, 2] == 7  # (the reference's multinomial refuses NaN probabilities here)


# --- float -> PCM16 ---------------------------------------------------------------------------


def _pcm_inputs() -> np.ndarray:
    rng = np.random.default_rng(0)
    edge = np.array([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 1e-9, -1e-9, 0.5 / 32767, -0.5 / 32767, 1.5 / 32767], np.float32)
    ties = (np.arange(-40, 40) + 0.5).astype(np.float32) / np.float32(32767)
    return np.concatenate([edge, ties, rng.standard_normal(10_001).astype(np.float32) * 0.7])


def test_pcm16_matches_numpy_reference():
    from dia_fast.audio.pcm import float_to_pcm16

    x = _pcm_inputs()
    got = float_to_pcm16(x, backend="cpp")
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, float_to_pcm16(x, backend="numpy"))
    # independent check: exact float64 arithmetic, round half to even, saturate
    want = np.clip(np.rint(x.astype(np.float64) * 32767.0), -32768, 32767).astype(np.int16)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(float_to_pcm16(x.reshape(1, -1)[:, ::-1], backend="cpp"), want[::-1][None])
    for backend in ("numpy", "cpp"):  # one sample as a 0-d array or a NumPy scalar keeps its (empty) shape
        assert float_to_pcm16(np.array(0.5, np.float32), backend=backend) == np.array(16384, np.int16)
        assert float_to_pcm16(np.float64(-2.0), backend=backend).shape == ()


def test_pcm16_dither(ext):
    from dia_fast.audio.pcm import float_to_pcm16

    x = _pcm_inputs()
    plain = float_to_pcm16(x, backend="cpp").astype(np.int32)
    a = float_to_pcm16(x, dither=True, seed=5, backend="cpp")
    np.testing.assert_array_equal(a, float_to_pcm16(x, dither=True, seed=5, backend="cpp"))
    assert not np.array_equal(a, float_to_pcm16(x, dither=True, seed=6, backend="cpp"))
    assert np.abs(a.astype(np.int32) - plain).max() <= 1
    # TPDF: for y = v * 32767 with fractional part f in [0, 0.5), the sample rounds up with
    # probability P(n >= 0.5 - f) = (0.5 + f)^2 / 2 and down with P(n < -0.5 - f) = (0.5 - f)^2 / 2
    n = 400_000
    v = np.float32(0.2 / 32767)
    y = float(np.float64(v) * 32767.0)
    src = np.full(n, v, np.float32)
    dst = np.empty(n, np.int16)
    ext.float_to_pcm16(src, dst, True, 2**64 + 3)  # any Python int is a seed
    p_up, p_down = (0.5 + y) ** 2 / 2, (0.5 - y) ** 2 / 2
    for value, p in ((1, p_up), (-1, p_down)):
        freq = float((dst == value).mean())
        assert abs(freq - p) < 5 * (p * (1 - p) / n) ** 0.5, (value, freq, p)
    assert set(np.unique(dst).tolist()) <= {-1, 0, 1}


def test_pcm16_args(ext):
    with pytest.raises(TypeError):
        ext.float_to_pcm16(np.zeros(4, np.float64), np.zeros(4, np.int16), False, 0)
    with pytest.raises(ValueError, match="length"):
        ext.float_to_pcm16(np.zeros(4, np.float32), np.zeros(3, np.int16), False, 0)


# --- dispatch ---------------------------------------------------------------------------------


def test_cpp_backend_available_and_reported(ext):
    assert ops.backend_available("cpp", "cpu") == (True, "extension loaded")
    assert not ops.backend_available("cpp", "cuda")[0]
    info = _ext.build_info()
    assert info["loaded"] and info["abi_version"] == _ext.ABI_VERSION
    assert info["version"] == dia_fast.__version__
    assert {"apply_delay", "cfg_sample", "float_to_pcm16"} <= set(info["kernels"])


def test_greedy_generation_same_with_cpp_and_torch_backends():
    from dia_fast import DiaTTS

    tts = DiaTTS.random("tiny", seed=0)
    kw = {"max_new_tokens": 40, "do_sample": False, "decode_audio": False, "progress": False}
    assert ops.select_backend("cfg_sample", "cpu") == "cpp"
    fast = tts.generate(["[S1] Hello there.", "[S2] Hi!"], **kw)
    ops.set_backend("torch")
    try:
        ref = tts.generate(["[S1] Hello there.", "[S2] Hi!"], **kw)
    finally:
        ops.set_backend(None)
    assert torch.equal(fast.delayed, ref.delayed)
    assert all(torch.equal(a, b) for a, b in zip(fast.codes, ref.codes, strict=True))


def test_seeded_per_row_sampling_equals_the_reference():
    """cfg_sample_rows (seeded draws, per-row settings, allow_eos): the reference's codes. Without a nucleus
    filter they are equal; with one, C++ sums the nucleus in double precision, so a row whose top-p boundary lies
    within rounding of the reference's may keep one id more or less (none did among these 1,080 rows)."""
    g = torch.Generator().manual_seed(0)
    B, C, V = 6, 9, 1028
    same = total = 0
    for _ in range(20):
        cond = torch.randn(B, C, V, generator=g) * 3
        uncond = cond + torch.randn(B, C, V, generator=g)
        cond[::3, 0, 1024] += 20  # EOS as channel 0's argmax on some rows
        kw = dict(
            cfg_scale=torch.tensor([3.0, 0.0, 1.5, 2.0, 3.0, 1.0]),
            temperature=torch.tensor([1.2, 0.0, 0.8, 2.0, 1.0, 1.5]),
            top_p=torch.tensor([0.95, 1.0, 0.5, 0.9, 1.0, 0.99]),
            top_k=torch.tensor([45, 0, 3, 10, 0, 2000]),
            seed=torch.randint(-(2**62), 2**62, (B,), generator=g),
            offset=torch.randint(0, 3000, (B,), generator=g),
            allow_eos=torch.tensor([True, False, True, True, False, True]),
        )
        got = ops.cfg_sample(cond, uncond, backend="cpp", **kw)
        want = reference.cfg_sample(cond, uncond, **kw)
        exact = kw["top_p"] >= 1.0
        assert torch.equal(got[exact], want[exact])
        same += int((got == want).sum())
        total += got.numel()
        assert not bool((got[[1, 4], 0] == 1024).any())  # allow_eos False: never EOS
    assert same == total

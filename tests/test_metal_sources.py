"""The Metal backend on any platform: shader sources parsed and checked against the Python side,
dispatch wiring, argument checking; plus ``@pytest.mark.mps`` tests that run the kernels on an
Apple GPU (skipped elsewhere)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dia_fast import ops
from dia_fast.ops import metal, reference

ROOT = Path(__file__).resolve().parents[1]
DIA_DELAYS = [0, 8, 9, 10, 11, 12, 13, 14, 15]


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _split_top(params: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in params:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur)
    return [p.strip() for p in out]


def parse_kernels(src: str) -> dict[str, dict]:
    """{kernel name: {"args": [(type, name, buffer index)], "builtins": [(attribute, name)]}}."""
    src = _strip_comments(src)
    kernels = {}
    for m in re.finditer(r"\bkernel\s+void\s+(\w+)\s*\(", src):
        depth, i = 1, m.end()
        while depth:
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        args, builtins = [], []
        for p in _split_top(src[m.end() : i - 1]):
            attr = re.search(r"\[\[\s*([^\]]+?)\s*\]\]\s*$", p)
            assert attr, f"{m.group(1)}: parameter without an attribute: {p!r}"
            decl = " ".join(p[: attr.start()].replace("*", "* ").replace("&", "& ").split())
            decl = decl.replace(" *", "*").replace(" &", "&")
            ctype, name = decl.rsplit(" ", 1)
            buf = re.fullmatch(r"buffer\((\d+)\)", attr.group(1))
            if buf:
                args.append((ctype, name, int(buf.group(1))))
            else:
                builtins.append((attr.group(1), name))
        kernels[m.group(1)] = {"args": args, "builtins": builtins}
    return kernels


def _defines(src: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"#define\s+(\w+)\s+(\d+)\s*$", src, flags=re.M)}


@pytest.fixture(scope="module")
def source() -> str:
    return metal.load_sources()


def test_sources_found_in_tree_and_listed():
    assert metal.kernel_dir() == ROOT / "kernels"
    assert sorted(p.name for p in (ROOT / "kernels").glob("*.metal")) == sorted(metal.SOURCES)


def test_kernel_names_and_argument_lists_match_python(source):
    parsed = parse_kernels(source)
    assert set(parsed) == set(metal.SIGNATURES)
    for name, sig in metal.SIGNATURES.items():
        got = parsed[name]
        assert [(t, n) for t, n, _ in got["args"]] == [tuple(a) for a in sig["args"]], name
        # buffer(i) is the i-th argument of the Python call: indices must be 0, 1, 2, ... in order
        assert [i for _, _, i in got["args"]] == list(range(len(sig["args"]))), name
        assert got["builtins"] == [tuple(b) for b in sig["builtins"]], name
        for ctype, _ in sig["args"]:
            if ctype.startswith("device"):
                assert ctype.rstrip("*").split()[-1] in metal.BUFFER_DTYPES
            else:
                assert ctype in ("constant long&", "constant float&")


def test_defines_match_python(source):
    defs = _defines(source)
    for name, sig in metal.SIGNATURES.items():
        for key, value in sig.get("defines", {}).items():
            assert defs[key] == value, (name, key)
        if "group_size" in sig:
            group_key = next(k for k in sig.get("defines", {}) if k.endswith("_GROUP"))
            assert sig["group_size"] == defs[group_key]
            assert defs[group_key] & (defs[group_key] - 1) == 0  # tree reductions need a power of two


def test_sources_are_balanced_and_self_contained(source):
    code = _strip_comments(source)
    assert code.count("{") == code.count("}") and code.count("(") == code.count(")")
    assert set(re.findall(r"#include\s*<([^>]+)>", code)) == {"metal_stdlib"}
    # torch.mps.compile_shader reads the source as ASCII
    assert source.isascii()
    # the library may be compiled with fast math (no infinities / NaNs): masks use finite sentinels
    assert not re.search(r"\b(INFINITY|NAN|isinf|isnan)\b", code)


class _FakeLibrary:
    """Stands in for torch.mps.compile_shader's library: records every launch."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def __getattr__(self, name: str):
        def kernel(*args, **kwargs):
            self.calls.append((name, args, kwargs))

        return kernel


@pytest.fixture
def fake_lib(monkeypatch):
    lib = _FakeLibrary()
    monkeypatch.setattr(metal, "_library", lambda: lib)
    return lib


def test_wrappers_launch_with_the_declared_arguments(fake_lib):
    codes = torch.randint(0, 1024, (2, 20, 9))
    metal.apply_delay(codes, DIA_DELAYS, 1026, 1025)
    metal.revert_delay(codes, DIA_DELAYS)
    metal.undelay_codes(codes, DIA_DELAYS, 1024)
    q = torch.randn(2, 8, 1, 64).half()
    kc = torch.randn(2, 2, 33, 64).half()
    metal.decode_attention(q, kc, kc.clone(), scale=0.125, kv_len=torch.tensor([5, 33]))
    cond = torch.randn(2, 9, 1028)
    metal.cfg_sample(cond, cond.clone(), do_sample=True)
    metal.cfg_sample(cond, cond.clone(), do_sample=False)
    names = [c[0] for c in fake_lib.calls]
    assert names == [
        "dia_apply_delay",
        "dia_revert_delay",
        "dia_undelay_codes",
        "dia_decode_attention_f16",
        "dia_cfg_sample_f32",
        "dia_cfg_sample_f32",
    ]
    by_name = {c[0]: c for c in fake_lib.calls}
    _, args, kw = by_name["dia_apply_delay"]
    assert kw == {"threads": 2 * 20 * 9} and args[3:] == (2 * 20 * 9, 20, 9, 1026, 1025)
    _, args, kw = by_name["dia_undelay_codes"]
    assert kw == {"threads": 2 * 5 * 9} and args[3:] == (2 * 5 * 9, 20, 9, 5, 1024)
    assert tuple(args[1].shape) == (2, 5, 9)
    _, args, kw = by_name["dia_decode_attention_f16"]
    assert kw == {"threads": 2 * 8 * metal.ATTN_GROUP, "group_size": metal.ATTN_GROUP}
    assert args[5:] == (8, 2, 33, 64, 0.125)
    assert args[3].tolist()[0] == [1] * 5 + [0] * 28  # kv_len folded into the uchar mask
    _, args, kw = fake_lib.calls[-1]
    assert kw == {"threads": 2 * 9 * metal.SAMPLE_GROUP, "group_size": metal.SAMPLE_GROUP}
    assert args[4:9] == (9, 1028, 45, 1024, 1)  # greedy flag set
    assert fake_lib.calls[-2][1][8] == 0


def test_wrappers_fall_back_outside_kernel_coverage(fake_lib):
    q = torch.randn(1, 4, 1, 16)  # float32: the kernel is f16 only
    kc = torch.randn(1, 2, 7, 16)
    out = metal.decode_attention(q, kc, kc, scale=0.25)
    torch.testing.assert_close(out, reference.decode_attention(q, kc, kc, scale=0.25))
    codes = torch.randint(0, 9, (1, 4, 3), dtype=torch.int32)
    assert torch.equal(metal.revert_delay(codes, [0, 1, 2]), reference.revert_delay(codes, [0, 1, 2]))
    big = torch.randn(1, 2, metal.SAMPLE_MAX_VOCAB + 1)
    assert metal.cfg_sample(big, big, eos_id=5, do_sample=False).shape == (1, 2)
    assert fake_lib.calls == []


def test_launch_rejects_mismatched_arguments(fake_lib):
    codes = torch.zeros(1, 2, 3, dtype=torch.int64)
    d = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="takes 6 arguments"):
        metal._launch("dia_revert_delay", codes, codes, d, 6, 2, threads=6)
    with pytest.raises(TypeError, match="torch.int64"):
        metal._launch("dia_revert_delay", codes.int(), codes, d, 6, 2, 3, threads=6)
    with pytest.raises(TypeError, match="Python int"):
        metal._launch("dia_revert_delay", codes, codes, d, 6.0, 2, 3, threads=6)
    with pytest.raises(TypeError, match="Python float"):
        h = torch.zeros(1, dtype=torch.float16)
        m = torch.zeros(1, dtype=torch.uint8)
        metal._launch("dia_decode_attention_f16", h, h, h, m, h, 1, 1, 1, 1, 1, threads=1)
    assert fake_lib.calls == []


def test_dispatch_registers_metal_and_reports_why_not():
    for op in ("apply_delay", "revert_delay", "undelay_codes", "decode_attention", "cfg_sample"):
        assert "metal" in ops._dispatch._REGISTRY[op]
    ok, why = ops.backend_available("metal", "mps")
    if not torch.backends.mps.is_available():
        assert not ok and "Apple GPU" in why
        assert ops.select_backend("decode_attention", "mps") == "torch"
    assert ops.backend_available("metal", "cpu")[0] is False


# --- on an Apple GPU ----------------------------------------------------------------------------


@pytest.mark.mps
def test_mps_compiles_and_selects_metal():
    assert metal.available() == (True, "Metal kernels compiled")
    assert ops.select_backend("cfg_sample", "mps") == "metal"


@pytest.mark.mps
@pytest.mark.parametrize("shape", [(1, 1, 9), (2, 37, 9), (3, 130, 4)])
def test_mps_delay_ops(shape):
    codes = torch.randint(-2, 1030, shape)
    pattern = DIA_DELAYS if shape[2] == 9 else [0, 3, 1, 2]
    dev = codes.to("mps")
    assert torch.equal(metal.apply_delay(dev, pattern, 7, 8).cpu(), reference.apply_delay(codes, pattern, 7, 8))
    assert torch.equal(metal.revert_delay(dev, pattern).cpu(), reference.revert_delay(codes, pattern))
    assert torch.equal(metal.undelay_codes(dev, pattern, 1024).cpu(), reference.undelay_codes(codes, pattern, 1024))


@pytest.mark.mps
@pytest.mark.parametrize("B,Hq,Hkv,L,D", [(1, 4, 4, 1, 64), (2, 8, 2, 1500, 128), (1, 16, 4, 3000, 128)])
def test_mps_decode_attention(B, Hq, Hkv, L, D):
    q = torch.randn(B, Hq, 1, D)
    k = torch.randn(B, Hkv, L, D)
    v = torch.randn(B, Hkv, L, D)
    kv_len = torch.randint(1, L + 1, (B,))
    want = reference.decode_attention(q, k, v, scale=D**-0.5, kv_len=kv_len)
    got = metal.decode_attention(
        q.half().to("mps"), k.half().to("mps"), v.half().to("mps"), scale=D**-0.5, kv_len=kv_len.to("mps")
    )
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.mps
def test_mps_cfg_sample_greedy_and_support():
    cond = torch.randn(3, 9, 1028) * 3
    uncond = torch.randn(3, 9, 1028) * 3
    want = reference.cfg_sample(cond, uncond, do_sample=False)
    got = metal.cfg_sample(cond.to("mps"), uncond.to("mps"), do_sample=False).cpu()
    assert torch.equal(got, want)
    gen = torch.Generator(device="mps").manual_seed(0)
    codes = metal.cfg_sample(cond.to("mps"), uncond.to("mps"), generator=gen).cpu()
    logits = reference.filter_cfg_logits(cond, uncond, cfg_scale=3.0, top_k=45, eos_id=1024)
    probs = reference.top_p_filter(logits / 1.2, 0.95).softmax(-1)
    assert bool((probs.gather(-1, codes[..., None]) > 0).all())


# --- the shaders' logic on the CPU ------------------------------------------------------------
# Metal cannot run here, but the kernels are C++14-style code: with a small header standing in for
# <metal_stdlib> (address spaces erased, threadgroup arrays made shared, threadgroup_barrier a
# real barrier over one std::thread per GPU thread) g++ compiles the unmodified .metal sources and
# the tests below run them group by group against the references. This checks the algorithms
# (indexing, reductions, barriers, online softmax, top-k / top-p / EOS logic), not the Metal
# compiler or GPU memory-model details; the mps-marked tests above do that on a Mac.

_SHIM = r"""
#pragma once
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
typedef _Float16 half;
typedef unsigned char uchar;
typedef unsigned int uint;
#define kernel
#define device
#define constant const
#define threadgroup

// A reusable barrier that gives up after a timeout (divergent barriers would hang otherwise).
struct EmuBarrier {
  std::mutex m;
  std::condition_variable cv;
  int n = 1, count = 0;
  long gen = 0;
  bool broken = false;
  void wait() {
    std::unique_lock<std::mutex> lock(m);
    if (broken) return;
    const long g = gen;
    if (++count == n) { count = 0; ++gen; cv.notify_all(); return; }
    if (!cv.wait_for(lock, std::chrono::seconds(20), [&] { return gen != g || broken; })) {
      broken = true;
      cv.notify_all();
    }
  }
};
inline EmuBarrier* emu_barrier = nullptr;

namespace metal {
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
using std::max;
using std::min;
template <class T, class U> inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U));
  T t;
  std::memcpy(&t, &u, sizeof t);
  return t;
}
namespace precise { inline float exp(float x) { return std::exp(x); } }
inline void threadgroup_barrier(mem_flags) { emu_barrier->wait(); }
}  // namespace metal
"""

_LAUNCHERS = r"""
#include <thread>
#include <vector>
#include "all.metal"

// dispatchThreads(threads, group_size): group g, thread t of the group; one group at a time, since
// threadgroup memory is shared static storage here.
template <class F>
static int run_groups(long threads, long group_size, F f) {
  if (threads % group_size != 0) return 2;
  EmuBarrier bar;
  bar.n = int(group_size);
  emu_barrier = &bar;
  for (long g = 0; g < threads / group_size; ++g) {
    std::vector<std::thread> pool;
    for (long t = 0; t < group_size; ++t) pool.emplace_back([&, g, t] { f(uint(g), uint(t)); });
    for (auto& th : pool) th.join();
    if (bar.broken) return 1;
  }
  return 0;
}

extern "C" {
int emu_dia_apply_delay(const long* codes, long* out, const long* d, long n, long T, long C, long bos, long pad,
                        long threads, long) {
  for (long i = 0; i < threads; ++i) dia_apply_delay(codes, out, d, n, T, C, bos, pad, uint(i));
  return 0;
}
int emu_dia_revert_delay(const long* codes, long* out, const long* d, long n, long T, long C, long threads, long) {
  for (long i = 0; i < threads; ++i) dia_revert_delay(codes, out, d, n, T, C, uint(i));
  return 0;
}
int emu_dia_undelay_codes(const long* codes, long* out, const long* d, long n, long T, long C, long T_out, long cb,
                          long threads, long) {
  for (long i = 0; i < threads; ++i) dia_undelay_codes(codes, out, d, n, T, C, T_out, cb, uint(i));
  return 0;
}
int emu_dia_decode_attention_f16(const half* q, const half* k, const half* v, const uchar* mask, half* out, long Hq,
                                 long Hkv, long L, long D, float scale, long threads, long group_size) {
  if (group_size != DIA_ATTN_GROUP) return 3;
  return run_groups(threads, group_size, [&](uint g, uint t) {
    dia_decode_attention_f16(q, k, v, mask, out, Hq, Hkv, L, D, scale, g, t);
  });
}
int emu_dia_cfg_sample_f32(const float* cond, const float* uncond, const float* u, long* out, long C, long V,
                           long top_k, long eos, long greedy, float cfg, float temp, float top_p, long threads,
                           long group_size) {
  if (group_size != DIA_SAMPLE_GROUP) return 3;
  return run_groups(threads, group_size, [&](uint g, uint t) {
    dia_cfg_sample_f32(cond, uncond, u, out, C, V, top_k, eos, greedy, cfg, temp, top_p, g, t);
  });
}
}
"""

EMU_ATTN_GROUP, EMU_ATTN_CHUNK, EMU_SAMPLE_GROUP = 32, 8, 32


class _EmuLibrary:
    """Plays torch.mps.compile_shader's library on the CPU: kernel(*args, threads=, group_size=)
    binds tensors as buffers, ints as long and floats as float, in order, like the real one."""

    def __init__(self, lib) -> None:
        self.lib = lib

    def __getattr__(self, name: str):
        import ctypes

        fn = getattr(self.lib, f"emu_{name}")

        def kernel(*args, threads: int, group_size: int = 1):
            conv = []
            for a in args:
                if isinstance(a, torch.Tensor):
                    assert a.device.type == "cpu" and a.is_contiguous()
                    conv.append(ctypes.c_void_p(a.data_ptr()))
                elif isinstance(a, int):
                    conv.append(ctypes.c_long(a))
                else:
                    assert isinstance(a, float)
                    conv.append(ctypes.c_float(a))
            rc = fn(*conv, ctypes.c_long(threads), ctypes.c_long(group_size))
            assert rc == 0, {1: "a barrier timed out (divergent barrier)", 3: "wrong group size"}.get(rc, rc)

        return kernel


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory, source):
    import ctypes
    import shutil
    import subprocess

    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ to emulate the shaders")
    d = tmp_path_factory.mktemp("metal_emu")
    (d / "metal_stdlib").write_text(_SHIM)
    # threadgroup arrays declared in a kernel body are shared by the group: static storage here
    body = re.sub(r"^(\s+)threadgroup (?=\w+ \w+(\[|;))", r"\1static ", source, flags=re.M)
    (d / "all.metal").write_text(body)
    (d / "emu.cpp").write_text(_LAUNCHERS)
    lib = d / "emu.so"
    # -ffast-math: Metal may compile the library with fast math too
    cmd = [cxx, "-std=c++20", "-O1", "-ffast-math", "-shared", "-fPIC", "-pthread", "-Wno-attributes", f"-I{d}",
           f"-DDIA_ATTN_GROUP={EMU_ATTN_GROUP}", f"-DDIA_ATTN_CHUNK={EMU_ATTN_CHUNK}",
           f"-DDIA_SAMPLE_GROUP={EMU_SAMPLE_GROUP}", str(d / "emu.cpp"), "-o", str(lib)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and "_Float16" in res.stderr:
        pytest.skip("this g++ has no _Float16")
    assert res.returncode == 0, res.stderr[-4000:]
    return _EmuLibrary(ctypes.CDLL(str(lib)))


@pytest.fixture
def emu(emu_lib, monkeypatch):
    """dia_fast.ops.metal running its real wrappers and launches on the emulated shaders."""
    monkeypatch.setattr(metal, "_library", lambda: emu_lib)
    monkeypatch.setattr(metal, "ATTN_GROUP", EMU_ATTN_GROUP)
    monkeypatch.setattr(metal, "SAMPLE_GROUP", EMU_SAMPLE_GROUP)
    return metal


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 37, 9), (3, 5, 4), (1, 20, 9), (2, 0, 9)])
def test_emulated_delay_kernels(emu, shape):
    codes = torch.randint(-2, 1030, shape)
    pattern = DIA_DELAYS if shape[2] == 9 else [int(x) for x in torch.randint(0, 6, (shape[2],))]
    assert torch.equal(emu.apply_delay(codes, pattern, 1026, 1025), reference.apply_delay(codes, pattern, 1026, 1025))
    assert torch.equal(emu.revert_delay(codes, pattern), reference.revert_delay(codes, pattern))
    assert torch.equal(emu.undelay_codes(codes, pattern, 1024), reference.undelay_codes(codes, pattern, 1024))


@pytest.mark.parametrize("B,Hq,Hkv,L,D", [(1, 2, 2, 1, 16), (2, 4, 2, 19, 16), (1, 2, 1, 37, 32), (2, 2, 2, 8, 8)])
def test_emulated_decode_attention(emu, B, Hq, Hkv, L, D):
    q = torch.randn(B, Hq, 1, D).half()
    k = torch.randn(B, Hkv, L, D).half()
    v = torch.randn(B, Hkv, L, D).half()
    kv_len = torch.randint(1, L + 1, (B,))
    key_mask = torch.rand(B, L) > 0.3
    key_mask[:, 0] = True
    if B > 1:
        key_mask[1] = False  # batch row 1 sees no key at all: zeros
    out = emu.decode_attention(q, k, v, scale=D**-0.5, kv_len=kv_len, key_mask=key_mask)
    want = reference.decode_attention(q.float(), k.float(), v.float(), scale=D**-0.5, kv_len=kv_len, key_mask=key_mask)
    assert out.dtype == torch.float16 and out.shape == q.shape
    torch.testing.assert_close(out.float(), want, atol=4e-3, rtol=4e-3)


def test_decode_steps_sample_without_reading_settings_back(fake_lib, monkeypatch):
    """A decode step passes its settings as per-row tensors (with seeds and allow_eos): they go to the reference,
    which reads nothing back, instead of being read to the host (each read waits for the GPU) and then sampled by
    the reference anyway. Python-number settings still launch the kernel."""
    cond = torch.randn(2, 9, 1028)
    reads: list[str] = []
    monkeypatch.setattr(reference, "host_params", lambda *a: reads.append("host_params"))  # would read back
    rows = dict(cfg_scale=torch.full((2,), 3.0), temperature=torch.zeros(2), top_p=torch.ones(2),
                top_k=torch.full((2,), 45, dtype=torch.int32))  # fmt: skip
    seeded = dict(seed=torch.tensor([1, 2]), offset=torch.tensor([5, 7]), allow_eos=torch.ones(2, dtype=torch.bool))
    assert torch.equal(metal.cfg_sample(cond, cond.clone(), **rows, **seeded),
                       reference.cfg_sample(cond, cond.clone(), **rows, **seeded))  # fmt: skip
    assert not fake_lib.calls and not reads


def test_emulated_cfg_sample_edges_follow_the_reference(emu):
    """A temperature <= 0 is greedy and a top-p <= 0 keeps only the top candidate, as in the reference (the
    kernel divided by a negative temperature, and dropped the top candidate too)."""
    cond, uncond = torch.randn(2, 9, 1028) * 3, torch.randn(2, 9, 1028) * 3
    greedy = reference.cfg_sample(cond, uncond, do_sample=False)
    assert torch.equal(emu.cfg_sample(cond, uncond, temperature=-1.0, generator=torch.Generator()), greedy)
    for top_p in (0.0, -0.5):  # only the top candidate survives: the greedy code, whatever the uniform
        drawn = emu.cfg_sample(cond, uncond, top_p=top_p, generator=torch.Generator().manual_seed(3))
        assert torch.equal(drawn, greedy)


@pytest.mark.parametrize("V,top_k", [(1028, 45), (1028, None), (40, 4), (12, 1)])
def test_emulated_cfg_sample(emu, V, top_k):
    from dia_fast.ops import cpp

    B, C, eos = 2, 9, V - 4
    cond = torch.randn(B, C, V) * 3
    uncond = torch.randn(B, C, V) * 3
    cond[0, 0, eos] = 60.0  # EOS is channel 0's argmax in batch row 0
    if V == 40:  # batch row 1, channels 1-8: 20 exact ties above the rest; top-k keeps the 4 lowest ids
        cond[1, 1:, :20] = uncond[1, 1:, :20] = 1.5
        cond[1, 1:, 20:] = uncond[1, 1:, 20:] = -5.0
    kw = {"top_k": top_k, "eos_id": eos}
    greedy = emu.cfg_sample(cond, uncond, do_sample=False, **kw)
    want = reference.cfg_sample(cond, uncond, do_sample=False, **kw)
    if V == 40:  # torch.topk keeps an unspecified subset of tied values; the kernels keep the lowest ids
        assert bool((greedy[1, 1:] == 0).all())
        greedy, want = greedy[0], want[0]
    assert torch.equal(greedy, want)
    drawn = emu.cfg_sample(cond, uncond, generator=torch.Generator().manual_seed(5), **kw)
    probs = reference.top_p_filter(
        reference.filter_cfg_logits(cond, uncond, cfg_scale=3.0, top_k=top_k, eos_id=eos) / 1.2, 0.95
    ).softmax(-1)
    valid = ~probs.isnan().any(-1)  # rows whose filters leave nothing (top-k 1 above EOS) have no distribution
    if V == 40:
        valid[1, 1:] = False  # tied rows: checked below
    assert bool((probs.gather(-1, drawn[..., None])[..., 0] > 0)[valid].all())
    assert int(drawn[0, 0]) == eos
    if V == 40:
        assert bool((drawn[1, 1:] < 4).all())
    if cpp._ext.loaded():  # same generator state -> same uniforms -> the same inverse-CDF draws as the C++ kernel
        assert torch.equal(drawn, cpp.cfg_sample(cond, uncond, generator=torch.Generator().manual_seed(5), **kw))

#!/usr/bin/env bash
# The prepared GPU check of dia_fast: about 8-9 minutes on one H100/H200 (at most ~15 with every limit hit),
# no network needed.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]        (default OUTDIR: gpu_check_out)
#
# Where one command may run 10 minutes at most, run it as two: the first six stages' limits add up to 550 s
# (580 s with the 5 s each stage may take to stop),
#   GPU_CHECK_SKIP="bench compile kernels prefill quality" bash benchmarks/gpu_check.sh out1
#   GPU_CHECK_SKIP="env quick pytest load quant gemm" bash benchmarks/gpu_check.sh out2
#
# Stages, most important first, each under its own time limit (a hang in one still leaves the others' logs):
#   env       nvidia-smi, versions, dia_fast.info()
#   quick     dia_fast alone at Dia-1.6B shapes, bf16, batch 1 and 8, 512 steps, with the decode-step launch
#             count (aten/Triton and the profiler's GPU kernels): the numbers that matter, in about a minute
#   pytest    pytest -m gpu: every CUDA test (bf16 kernels against their references, CUDA graphs == eager)
#   load      continuous batching (BatchEngine, one CUDA graph per bucket) vs static batches vs sequential,
#             16 requests with distinct seeds (python -m dia_fast.bench --load)
#   quant     int8 / fp8 / int4 weight-only (torchao, from .whl/) beside bf16, batch 1 and 8, with the quality
#             block, the int8 GEMMs once by torchao and once by dia_fast's Triton kernel (python -m dia_fast.bench
#             --quantize ... --cuda-int8 torchao,dia_fast; docs/quantization.md)
#   gemm      the decoder's GEMMs at 2 and 16 rows: bf16 cuBLAS vs the int8 Triton kernel vs torchao int8 / int4
#             (benchmarks/test_bench_linear_gpu.py): which int8 kernel CUDA's quantize="int8" should use
#   bench     the same against transformers (eager) and dia_fast without CUDA graphs, on the same weights
#   compile   against transformers + torch.compile (static cache, the public best), batch 1
#   kernels   the kernel benchmarks (pytest-benchmark, CUDA-graph timings)
#   prefill   the MLP's GEMMs at 1024 rows (a voice prompt's prefill): bf16 cuBLAS vs the Triton int8 kernel's row
#             blocks vs the reference (an fp32 copy of the weight) vs torchao int8
#   quality   the quant stage at Dia widths with 2 + 2 layers, where the quality block means something on random
#             weights (at 18 layers bf16 against fp32 alone differs as much as any mode), with the loading memory
# Everything lands in OUTDIR: <stage>.log, quick.json, load.json, quant.json, gemm.json, bench.json, bench_compile.json,
# kernels.json, prefill.json, quality.json and
# summary.txt. The bench writes its JSON after every batch size, so a stage stopped by its limit keeps what
# it measured. Limits (seconds) per stage: GPU_CHECK_<STAGE>_S, e.g. GPU_CHECK_PYTEST_S=200; GPU_CHECK_STEPS
# (512) and GPU_CHECK_COMPARE_STEPS (256) set the steps; GPU_CHECK_SKIP a space-separated list of stages
# to leave out.
#
# Offline machines: the packages dia_fast needs beyond torch/triton/numpy travel as wheels in .whl/ (see
# docs/bench.md, "The GPU check"); they are installed to a private --target directory first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-gpu_check_out}
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-512}
COMPARE_STEPS=${GPU_CHECK_COMPARE_STEPS:-256}
SKIP=" ${GPU_CHECK_SKIP:-} "
summary="$OUTDIR/summary.txt"
: >"$summary"
note() { echo "$*" | tee -a "$summary"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dia_fast_site \
    .whl/*.whl >"$OUTDIR/wheels.log" 2>&1 || { note "carried wheels failed to install (see wheels.log)"; exit 1; }
  export PYTHONPATH="$PWD/python:/tmp/dia_fast_site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi

stage() {  # stage NAME DEFAULT_SECONDS CMD...: CMD under a time limit, its output in OUTDIR/NAME.log
  local name=$1 limit_var="GPU_CHECK_${1^^}_S" limit
  limit=${!limit_var:-$2}
  shift 2
  if [[ "$SKIP" == *" $name "* ]]; then
    note "stage $name: skipped"
    return 0
  fi
  local t0=$SECONDS
  # SIGINT, not timeout's SIGTERM: pytest then still runs its end-of-session hooks, where pytest-benchmark writes its
  # JSON and table (SIGTERM left the gemm/kernels/prefill stages with nothing); the bench stages keep theirs either way
  timeout -s INT --kill-after=5 "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  local rc=$?
  note "stage $name: exit $rc after $((SECONDS - t0)) s$([ $rc -eq 124 ] && echo " (time limit $limit s)")"
}

bench_summary() {  # bench_summary STAGE KEY UNIT...: a summary line per case of OUTDIR/STAGE.json (pytest-benchmark)
  $PY -c 'import json, sys
stage, path, pairs = sys.argv[1], sys.argv[2], sys.argv[3:]
for b in json.load(open(path))["benchmarks"]:
    e = b["extra_info"]
    print(stage, b["param"], *(f"{e[k]} {unit}" for k, unit in zip(pairs[::2], pairs[1::2])))' \
    "$1" "$OUTDIR/$1.json" "${@:2}" >>"$summary" 2>/dev/null || tail -n 5 "$OUTDIR/$1.log" >>"$summary"
}

stage env 30 bash -c "nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())'; $PY -c 'import transformers; print(\"transformers\", transformers.__version__)'; $PY -c 'import json, dia_fast; print(json.dumps(dia_fast.info(), indent=1, default=str))'"
grep -m1 -E "H100|H200|A100|L40|RTX" "$OUTDIR/env.log" | sed 's/^/device: /' >>"$summary"

BENCH=($PY -m dia_fast.bench --model dia-1.6b --device cuda --dtype bfloat16)
stage quick 100 "${BENCH[@]}" --batch 1,8 --steps "$STEPS" --compare none --count-launches --json "$OUTDIR/quick.json"
grep -E "^(engine|dia_fast|launches|GPU kernel time)" "$OUTDIR/quick.log" | awk '!seen[$0]++' >>"$summary"

stage pytest 140 $PY -m pytest -m gpu -q -p no:cacheprovider tests/ --no-header -rfE  # (the stage's limit bounds it)
tail -n 4 "$OUTDIR/pytest.log" >>"$summary"

stage load 75 "${BENCH[@]}" --load --requests 16 --steps 128 --repeat 1 --json "$OUTDIR/load.json"
grep -E "^(mode|continuous|static|sequential)" "$OUTDIR/load.log" >>"$summary"

stage quant 120 "${BENCH[@]}" --batch 1,8 --steps 128 --compare none --quantize int8,fp8,int4 --quality-steps 200 \
  --cuda-int8 torchao,dia_fast --no-loading-memory --json "$OUTDIR/quant.json"
grep -E "^(engine|dia_fast)|error" "$OUTDIR/quant.log" | awk '!seen[$0]++' >>"$summary"

stage gemm 85 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_linear_gpu.py -k "not prefill" \
  --benchmark-columns=min,rounds --benchmark-json "$OUTDIR/gemm.json"
bench_summary gemm us_per_call us GBps GB/s

stage bench 150 "${BENCH[@]}" --batch 1,8 --steps "$COMPARE_STEPS" --compare transformers,eager --json "$OUTDIR/bench.json"
grep -E "^(engine|dia_fast|transformers)" "$OUTDIR/bench.log" | awk '!seen[$0]++' >>"$summary"

stage compile 120 "${BENCH[@]}" --batch 1 --steps "$COMPARE_STEPS" --compare transformers-compile \
  --json "$OUTDIR/bench_compile.json"
grep -E "^(engine|dia_fast|transformers)" "$OUTDIR/compile.log" | awk '!seen[$0]++' >>"$summary"

stage kernels 60 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_attention.py \
  benchmarks/test_bench_sampling.py --benchmark-columns=mean,min,rounds --benchmark-json "$OUTDIR/kernels.json"
grep -E "^test_" "$OUTDIR/kernels.log" | grep -v reference | head -40 >>"$summary"

stage prefill 60 $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_linear_gpu.py -k prefill \
  --benchmark-columns=min,rounds --benchmark-json "$OUTDIR/prefill.json"
bench_summary prefill us_per_call us TFLOPs TFLOP/s

stage quality 90 "${BENCH[@]}" --layers 2 --batch 1,8 --steps 128 --compare none --quantize int8,fp8,int4 \
  --cuda-int8 torchao,dia_fast --quality-steps 200 --json "$OUTDIR/quality.json"
grep -E "^(engine|dia_fast)|error" "$OUTDIR/quality.log" | awk '!seen[$0]++' >>"$summary"
$PY -c 'import json, sys
m = json.load(open(sys.argv[1]))["meta"]
f = m.get("quality_floor") or {}
print("quality floor (bf16 vs fp32):", round(f.get("rel_logit_error", float("nan")), 4), round(f.get("top1_agreement_mean", float("nan")), 3))
for k, v in m["quantize"].items():
    q = v["quality"]
    print("quality", k, round(q["rel_logit_error"], 4), round(q["top1_agreement_mean"], 3))' "$OUTDIR/quality.json" >>"$summary" 2>/dev/null
cat "$summary"

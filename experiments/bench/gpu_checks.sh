#!/usr/bin/env bash
# The GPU session's checks and benchmarks in one go, each step under its own time limit so
# one slow step cannot starve the rest; logs go to $OUT (or ./gpu_logs).
#   bash experiments/bench/gpu_checks.sh [step ...]     steps: env tune bench profile tests fusedbf16 stream
#                                             encoders moe scaling mosaic mosaicbench (fusedbf16: the engine test of
#                                             the fused kernel that failed on the H100 in bf16, alone,
#                                             with its full report; mosaic: the Mosaic GPU lowering's
#                                             tests, compiled, then its tuning rows alone;
#                                             mosaicbench: the engine call with it; moe:
#                                             Mixtral-8x7B and GPT-OSS-20b widths, 4 layers,
#                                             against transformers, then the MoE tests on CUDA)
set -u
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_logs}; mkdir -p "$OUT"
PY=${PY:-python3}
steps=${*:-env tune bench profile tests}
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  grep -v "^I[0-9]\{4\} \|^W[0-9]\{4\} \|xla_bridge" "$OUT/$name.log" | tail -n "${TAIL:-40}"
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
}
for s in $steps; do case $s in
  env) step env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv; nproc; \
        $PY -c 'import jax, flax, torch, transformers, tensorstore, orbax.checkpoint; print(jax.__version__, jax.devices(), flax.__version__, torch.__version__, transformers.__version__)'" ;;
  tune) step tune 240 $PY -m plato_jax.experiments.bench.tune_fused ${TUNE_ARGS:---stream_rows=15000000} ;;
  bench) step bench_bf16 90 $PY -m plato_jax.experiments.bench.engine --dtype=bfloat16 --repeats=5
         step bench_f32 70 $PY -m plato_jax.experiments.bench.engine --dtype=float32 --repeats=3 ;;
  profile) step profile 60 $PY -m plato_jax.experiments.bench.profile --dtype=bfloat16 --queries=8192 --tile_rows=65536 --dim=1024 ;;
  tests) TAIL=25 step tests 150 env JAX_PLATFORMS=cuda $PY -m pytest -q -p no:cacheprovider -rf \
        ${TESTS:-tests/test_knn.py tests/test_large_k.py tests/test_topk_kernel.py tests/test_fused_topk.py} ;;
  fusedbf16) TAIL=80 step fusedbf16 120 env JAX_PLATFORMS=cuda $PY -m pytest -x -vv -p no:cacheprovider \
        --tb=long "tests/test_knn.py::test_fused_kernel_in_the_engine_equals_brute_force" ;;
  mosaic) TAIL=60 step mosaic_tests 150 env JAX_PLATFORMS=cuda $PY -m pytest -x -vv -p no:cacheprovider \
        --tb=long -k mosaic tests/test_fused_topk.py tests/test_knn.py
        step mosaic_tune 180 $PY -m plato_jax.experiments.bench.tune_fused --config=128,128,4,64,8,3,mosaic_gpu \
        --config=128,128,4,64,8,4,mosaic_gpu --config=64,128,4,64,8,4,mosaic_gpu \
        --config=128,128,4,64,8,4,mosaic_gpu,1 --config=128,128,4,64,8,3 ;;
  mosaicbench) step mosaic_bench 120 $PY -m plato_jax.experiments.bench.engine --dtype=bfloat16 --repeats=5 --k=10 \
        --kernel=fused:mosaic_gpu ;;
  stream) step stream 200 $PY -m plato_jax.experiments.bench.stream --rows=${STREAM_ROWS:-4000000} --dir=/tmp/bench_store ;;
  encoders) step encoders 180 $PY -m plato_jax.experiments.bench.encoders ;;
  moe) step moe 240 $PY -m plato_jax.experiments.bench.encoders --models=mixtral,gpt_oss --batch=8 \
        --seq=512 --moe_layers=${MOE_LAYERS:-4}
       TAIL=20 step moe_tests 120 env JAX_PLATFORMS=cuda $PY -m pytest -q -p no:cacheprovider -rf \
        tests/test_models_moe.py ;;
  scaling) step scaling 200 $PY -m experiments.scaling ${SCALING_ARGS:---gallery=1m} --out=/tmp/scaling_gpu ;;
  *) echo "unknown step $s" ;;
esac; done

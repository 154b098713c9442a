#!/usr/bin/env bash
# The GPU measurements of benchmarks/results/gpu_*: one script, run once on a
# lent GPU machine (the workplace's device tool), every step bounded by a
# timeout so that a hang or failure in one leaves the others' results.
#   OUT=<dir for results> [PACK=<file.tgz>] [STAGE=strategies|defaults|compile|timeline] \
#     bash benchmarks/gpu_run.sh
# PACK: after every step, also pack OUT into this one archive (the device
# tool brings back few files, and whatever a killed run leaves).
# Expects keras, keras-hub and keras-moe importable (PYTHONPATH), JAX and
# PyTorch with CUDA.
set -u
OUT="${OUT:-benchmarks/results}"
mkdir -p "${OUT}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
py="${PYTHON:-python3}"
step() {  # step SECONDS LOG COMMAND...: one bounded step, its log kept
  local limit=$1 log=$2
  shift 2
  echo "=== $* (limit ${limit}s)"
  local start=${SECONDS}
  timeout -k 5 "${limit}" "$@" > "${OUT}/${log}" 2>&1
  echo "    exit $? after $(( SECONDS - start ))s; tail:"
  grep -v "^\(I\|W\)0000" "${OUT}/${log}" | tail -n "${TAIL:-6}" | sed 's/^/    /'
  if [[ -n "${PACK:-}" ]]; then tar czf "${PACK}" -C "${OUT}" .; fi
}
if [[ "${STAGE:-strategies}" == compile ]]; then
  # PyTorch's compiled step (Keras' jit_compile=True: the whole train step
  # through torch.compile) beside eager, bf16, both GPU configs; then the
  # host-time proxy of benchmarks/host_overhead.py on this machine's CPU.
  TAIL=14 step 400 bench_torch_compile.log env KERAS_BACKEND=torch ${py} benchmarks/layer_speed.py \
    ${SMOKE:+--smoke} --configs gpu --dtype mixed_bfloat16 --repeats 5 --min-time 0.1 --warmup 2 \
    --torch-mode both --results-dir "${OUT}" --tag h200_compile --layers dense_ffn sparse_moe
  TAIL=10 step 240 host_overhead.log env KERAS_BACKEND=torch CUDA_VISIBLE_DEVICES= ${py} \
    benchmarks/host_overhead.py --results-dir "${OUT}" --tag device_host
  exit 0
fi
if [[ "${STAGE:-strategies}" == timeline ]]; then
  # Where the eager PyTorch step's GPU idles: a labeled profiler trace of a
  # few steps per layer (benchmarks/profile_torch.py --trace), then the idle
  # time by host phase (benchmarks/gpu_timeline.py). About 3 minutes.
  while read -r config layer; do
    [[ -n "${config}" ]] || continue
    trace="${OUT}/trace_${config}_${layer}.json.gz"
    TAIL=4 step 75 "profile_${config}_${layer}.log" env KERAS_BACKEND=torch ${py} \
      benchmarks/profile_torch.py ${SMOKE:+--smoke} --config "${config}" --layer "${layer}" \
      --dtype mixed_bfloat16 --trace "${trace}"
    TAIL=16 step 30 "timeline_${config}_${layer}.log" ${py} benchmarks/gpu_timeline.py "${trace}"
  done <<< "${PROFILES:-mixtral_half sparse_moe
mixtral_half dense_ffn
dsv2_lite sparse_moe}"
  exit 0
fi
if [[ "${STAGE:-strategies}" == defaults ]]; then
  # The chosen defaults (keras_moe.dispatch.default_strategy()) against the
  # baselines, and where PyTorch's step spends its time.
  common=(${SMOKE:+--smoke} --configs gpu --dtype mixed_bfloat16 --repeats 5 --min-time 0.1
          --warmup 2 --results-dir "${OUT}" --layers dense_ffn sparse_moe keras_hub_mixtral)
  # PROFILES: "config layer" pairs for benchmarks/profile_torch.py.
  for backend in ${BACKENDS:-jax torch}; do
    TAIL=12 step "$([[ ${backend} == jax ]] && echo 150 || echo 90)" "defaults_${backend}.log" \
      env KERAS_BACKEND="${backend}" ${py} benchmarks/layer_speed.py "${common[@]}" ${TAG:+--tag "${TAG}"}
  done
  while read -r config layer; do
    [[ -n "${config}" ]] || continue
    TAIL=30 step 50 "profile_torch_${config}_${layer}.log" env KERAS_BACKEND=torch ${py} \
      benchmarks/profile_torch.py ${SMOKE:+--smoke} --config "${config}" --layer "${layer}" \
      --dtype mixed_bfloat16
  done <<< "${PROFILES:-mixtral_half sparse_moe
dsv2_lite sparse_moe
mixtral_half dense_ffn}"
  exit 0
fi
nvidia-smi 2>/dev/null --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
${py} -c "import jax, torch, keras; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.version.cuda, '| keras', keras.__version__)"

# 1. Do the strategies agree here? (bf16, shapes that fit the Pallas tiles)
step 75 check_jax.log env KERAS_BACKEND=jax ${py} benchmarks/strategy_agreement.py \
  --strategies scan batched grouped:xla grouped:pallas --shape 2 512 256 8 2 256 --shared 256
step 50 check_torch.log env KERAS_BACKEND=torch ${py} benchmarks/strategy_agreement.py \
  --strategies ranges batched grouped scan --shape 2 512 256 8 2 256 --shared 256

# The Pallas kernels join the benchmark only if they agreed above (a kernel
# fault would take the whole JAX process down).
pallas=""
if grep -q "^grouped:pallas: loss.* ok$" "${OUT}/check_jax.log"; then pallas=grouped:pallas; fi

# 2. Training steps at real sizes, bf16: every candidate side by side.
common=(${SMOKE:+--smoke} --configs gpu --dtype mixed_bfloat16 --repeats 5 --min-time 0.1 --warmup 2
        --results-dir "${OUT}" --tag h200)
TAIL=20 step 220 bench_jax.log env KERAS_BACKEND=jax ${py} benchmarks/layer_speed.py "${common[@]}" \
  --layers dense_ffn sparse_moe sparse_moe_cf1.25 keras_hub_mixtral \
  --strategies grouped:xla ${pallas} scan
TAIL=20 step 140 bench_torch.log env KERAS_BACKEND=torch ${py} benchmarks/layer_speed.py "${common[@]}" \
  --layers dense_ffn sparse_moe sparse_moe_cf1.25 keras_hub_mixtral --strategies grouped ranges
# 3. torch.compile (what Keras' jit_compile=True does on torch), if time is
# left (STAGE=compile measures it properly).
TAIL=10 step 70 bench_torch_compile.log env KERAS_BACKEND=torch ${py} benchmarks/layer_speed.py ${SMOKE:+--smoke} \
  --configs mixtral_half --dtype mixed_bfloat16 --repeats 3 --min-time 0.1 --torch-mode compile \
  --results-dir "${OUT}" --tag h200_compile --layers dense_ffn sparse_moe --strategies grouped
ls -la "${OUT}"

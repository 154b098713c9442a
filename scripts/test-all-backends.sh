#!/usr/bin/env bash
# Runs the test suite once per Keras backend, each in its own process, and
# reports every backend: a crash (a segfault in native code, say) or a failure
# in one backend never hides the others' results.
#
# Extra arguments go to pytest, e.g. `bash scripts/test-all-backends.sh tests/layers -x`.
# Without arguments it runs the whole suite: every backend, then the
# multi-device tests (8 virtual devices) in processes of their own.
# KERAS_MOE_BACKENDS chooses the backends (default "jax tensorflow torch");
# PYTHON the interpreter (default `python`, the active virtual environment's).
# Exits 0 only if every backend passed.
set -uo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python}"
# Ctrl-C stops the whole run, not just the backend being tested.
trap 'echo "interrupted" >&2; exit 130' INT TERM

describe() {  # exit status of pytest -> one word and its detail
  local rc=$1
  case "${rc}" in
    0) echo "passed" ;;
    1) echo "failed (some tests failed)" ;;
    2) echo "failed (interrupted: exit 2)" ;;
    3) echo "failed (pytest internal error: exit 3)" ;;
    4) echo "failed (pytest usage error: exit 4)" ;;
    5) echo "failed (no tests collected: exit 5)" ;;
    *)
      if (( rc > 128 )); then
        # The shell reports a process killed by signal N as 128 + N.
        echo "crashed (signal $(( rc - 128 )), SIG$(kill -l $(( rc - 128 )) 2>/dev/null || echo '?'); exit ${rc})"
      else
        echo "failed (exit ${rc})"
      fi
      ;;
  esac
}

cpu_file=$(mktemp)
trap 'rm -f "${cpu_file}"' EXIT
children_cpu() {  # sets `cpu`: user + system seconds of the finished children so far
  times > "${cpu_file}"  # in this shell: a $(...) subshell would count its own children
  cpu=$(tail -n 1 "${cpu_file}" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] }; printf "%d", s }')
}

summary=()
status=0
run() {  # run LABEL HEADER [ENV=VALUE ...] -- PYTEST_ARGS...: one pytest process, one summary line
  local label=$1 header=$2 envs=()
  shift 2
  while [[ $1 != "--" ]]; do envs+=("$1"); shift; done
  shift
  echo "=== ${header}"
  local start=${SECONDS}
  children_cpu
  local cpu_start=${cpu}
  env "${envs[@]}" "${python}" -m pytest -p no:cacheprovider "$@"
  local rc=$?
  (( rc == 0 )) || status=1
  children_cpu
  # CPU time beside wall time: on a shared machine it is the steadier figure.
  summary+=("$(printf '%-26s %-46s %5ss wall %5ss cpu' "${label}" "$(describe "${rc}")" \
    "$(( SECONDS - start ))" "$(( cpu - cpu_start ))")")
}

for backend in ${KERAS_MOE_BACKENDS:-jax tensorflow torch}; do
  run "${backend}" "KERAS_BACKEND=${backend}" KERAS_BACKEND="${backend}" -- "$@"
done

# The whole suite (no arguments) includes the multi-device tests of expert
# parallelism, each in a process of its own: JAX and TensorFlow fix their
# device configuration when they start (scripts/test-distribution.sh).
if (( $# == 0 )); then
  for backend in ${KERAS_MOE_BACKENDS:-jax tensorflow torch}; do
    case "${backend}" in
      jax) run "jax, 8 host devices" "KERAS_BACKEND=jax, 8 host devices (tests/distribution)" \
             KERAS_BACKEND=jax \
             XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" \
             -- tests/distribution/expert_parallel_test.py ;;
      tensorflow) run "tensorflow, 8 DTensor CPUs" \
             "KERAS_BACKEND=tensorflow, 8 logical CPU devices (tests/distribution)" KERAS_BACKEND=tensorflow \
             KERAS_MOE_TF_LOGICAL_CPUS=8 -- tests/distribution/dtensor_test.py ;;
    esac
  done
fi

echo "=== Summary (one process per backend)"
printf '  %s\n' "${summary[@]}"
exit "${status}"

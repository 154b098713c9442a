#!/usr/bin/env bash
# Runs the test suite once per Keras backend, each in its own process, and
# reports every backend: a crash (a segfault in native code, say) or a failure
# in one backend never hides the others' results.
#
#   bash scripts/test-all-backends.sh [--jobs N] [pytest arguments]
#
# Extra arguments go to pytest, e.g. `bash scripts/test-all-backends.sh tests/layers -x`.
# Without arguments it runs the whole suite: every backend (JAX, the slowest,
# split in two processes by test directory) and the multi-device tests
# (8 virtual devices) in processes of their own.
#
# --jobs N (or KERAS_MOE_TEST_JOBS=N) runs up to N of these processes at a
# time, longest first; the default is the machine's core count. With more than
# one job each process's output goes to a log that is printed whole when the
# process ends (in the order they end); `--jobs 1` runs them one after the
# other with their output live, in the order listed.
# KERAS_MOE_BACKENDS chooses the backends (default "jax tensorflow torch");
# PYTHON the interpreter (default `python`, the active virtual environment's).
# Exits 0 only if every process passed.
set -uo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python}"
jobs="${KERAS_MOE_TEST_JOBS:-}"
case "${1:-}" in
  --jobs) jobs="${2:-}"; shift 2 || shift ;;
  --jobs=*) jobs="${1#--jobs=}"; shift ;;
esac
if [[ -z "${jobs}" ]]; then
  jobs=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
fi
if ! [[ "${jobs}" =~ ^[1-9][0-9]*$ ]]; then
  echo "--jobs (or KERAS_MOE_TEST_JOBS) must be a positive integer, got '${jobs}'" >&2
  exit 4
fi

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

# The processes to run: parallel arrays, and for process i the array
# `args_i` holding its environment (NAME=VALUE ...), `--`, then pytest's
# arguments. The cost (about its CPU seconds on CI) orders the start of
# processes run side by side, most costly first.
labels=()
headers=()
costs=()
add() {  # add COST LABEL HEADER [NAME=VALUE ...] -- PYTEST_ARGS...
  local i=${#labels[@]}
  costs+=("$1")
  labels+=("$2")
  headers+=("$3")
  shift 3
  declare -g -a "args_${i}"
  local -n args="args_${i}"
  args=("$@")
}

backends="${KERAS_MOE_BACKENDS:-jax tensorflow torch}"
if (( $# > 0 )); then
  for backend in ${backends}; do
    case "${backend}" in jax) cost=3 ;; tensorflow) cost=2 ;; *) cost=1 ;; esac
    add "${cost}" "${backend}" "KERAS_BACKEND=${backend}" KERAS_BACKEND="${backend}" -- "$@"
  done
else
  # JAX, which compiles every new shape and program, takes longer than the
  # other backends together: two processes, by directory, the first about
  # twice as long as the second (which follows TensorFlow's when two run at
  # a time). The second takes every directory not named in the first, so a
  # new test directory is never left out.
  jax_first=(tests/layers tests/integrations tests/parity tests/dispatch)
  jax_rest=(tests)
  for path in "${jax_first[@]}"; do jax_rest+=("--ignore=${path}"); done
  for backend in ${backends}; do
    case "${backend}" in
      jax)
        add 300 "jax [1/2]" "KERAS_BACKEND=jax [1/2]: ${jax_first[*]}" KERAS_BACKEND=jax \
          -- "${jax_first[@]}"
        add 150 "jax [2/2]" "KERAS_BACKEND=jax [2/2]: the other test directories" KERAS_BACKEND=jax \
          -- "${jax_rest[@]}" ;;
      tensorflow) add 240 tensorflow "KERAS_BACKEND=tensorflow" KERAS_BACKEND=tensorflow -- ;;
      *) add 40 "${backend}" "KERAS_BACKEND=${backend}" KERAS_BACKEND="${backend}" -- ;;
    esac
  done
  # The multi-device tests of expert parallelism, each in a process of its
  # own: JAX and TensorFlow fix their device configuration when they start
  # (scripts/test-distribution.sh).
  for backend in ${backends}; do
    case "${backend}" in
      jax) add 50 "jax, 8 host devices" "KERAS_BACKEND=jax, 8 host devices (tests/distribution)" \
             KERAS_BACKEND=jax \
             XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" \
             -- tests/distribution/expert_parallel_test.py ;;
      tensorflow) add 10 "tensorflow, 8 DTensor CPUs" \
             "KERAS_BACKEND=tensorflow, 8 logical CPU devices (tests/distribution)" \
             KERAS_BACKEND=tensorflow KERAS_MOE_TF_LOGICAL_CPUS=8 -- tests/distribution/dtensor_test.py ;;
    esac
  done
fi

workdir=$(mktemp -d)
trap 'rm -rf "${workdir}"' EXIT
pids=()  # the processes under way
interrupted() {  # Ctrl-C stops the whole run, not just the processes under way
  local pid
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null; done
  wait
  echo "interrupted" >&2
  exit 130
}
trap interrupted INT TERM

launch() {  # launch I: runs process I; writes its exit status, wall and CPU seconds to $workdir/I.status
  local i=$1
  local -n args="args_${i}"
  local envs=() rest=("${args[@]}")
  while [[ ${rest[0]} != "--" ]]; do envs+=("${rest[0]}"); rest=("${rest[@]:1}"); done
  rest=("${rest[@]:1}")
  local start=${SECONDS} pid rc
  # Background commands of a script ignore SIGINT, so the script's trap stops
  # them: TERM to this subshell, which passes it on to pytest.
  trap 'kill "${pid}" 2>/dev/null; exit 143' TERM
  env "${envs[@]}" "${python}" -m pytest -p no:cacheprovider "${rest[@]}" &
  pid=$!
  wait "${pid}"
  rc=$?
  # CPU time beside wall time: on a shared machine it is the steadier figure.
  # `times` here counts this subshell's children: pytest and what it started.
  # `times` in this shell, not in a pipeline's subshell (whose children are none).
  times > "${workdir}/${i}.times"
  local cpu
  cpu=$(tail -n 1 "${workdir}/${i}.times" | awk '{ s = 0; for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); s += t[1] * 60 + t[2] }; printf "%d", s }')
  echo "${rc} $(( SECONDS - start )) ${cpu}" > "${workdir}/${i}.status.tmp"
  mv "${workdir}/${i}.status.tmp" "${workdir}/${i}.status"
}

report() {  # report I: the summary line of finished process I
  local i=$1 rc wall cpu
  read -r rc wall cpu < "${workdir}/${i}.status"
  (( rc == 0 )) || status=1
  summary[i]=$(printf '%-26s %-46s %5ss wall %5ss cpu' "${labels[i]}" "$(describe "${rc}")" "${wall}" "${cpu}")
}

count=${#labels[@]}
summary=()
status=0
start=${SECONDS}
if (( jobs == 1 || count == 1 )); then
  for (( i = 0; i < count; i++ )); do
    echo "=== ${headers[i]}"
    ( launch "${i}" ) &
    pids=($!)
    wait "${pids[0]}"
    [[ -e "${workdir}/${i}.status" ]] || echo "137 0 0" > "${workdir}/${i}.status"
    report "${i}"
  done
else
  # Most costly first (stable: equal costs keep the order listed).
  mapfile -t order < <(for (( i = 0; i < count; i++ )); do echo "${costs[i]} ${i}"; done \
    | sort -s -k1,1nr | cut -d' ' -f2)
  next=0
  running=0
  done_count=0
  declare -A reported=()
  while (( done_count < count )); do
    while (( running < jobs && next < count )); do
      i=${order[next]}
      echo "--- started: ${headers[i]}"
      ( launch "${i}" > "${workdir}/${i}.log" 2>&1 ) &
      pids+=($!)
      next=$(( next + 1 ))
      running=$(( running + 1 ))
    done
    wait -n
    none_left=$?  # 127: no process under way any more
    finished=0
    for i in "${order[@]:0:next}"; do
      if [[ -z "${reported[$i]:-}" && -e "${workdir}/${i}.status" ]]; then
        reported[$i]=1
        finished=1
        running=$(( running - 1 ))
        done_count=$(( done_count + 1 ))
        echo "=== ${headers[i]}"
        cat "${workdir}/${i}.log"
        report "${i}"
      fi
    done
    if (( none_left == 127 && ! finished )); then
      # A process ended without writing its status (killed with its shell).
      for i in "${order[@]:0:next}"; do
        if [[ -z "${reported[$i]:-}" ]]; then
          reported[$i]=1
          running=$(( running - 1 ))
          done_count=$(( done_count + 1 ))
          echo "=== ${headers[i]}"
          cat "${workdir}/${i}.log" 2>/dev/null
          echo "137 0 0" > "${workdir}/${i}.status"
          report "${i}"
        fi
      done
    fi
  done
fi

echo "=== Summary (one process per backend)"
printf '  %s\n' "${summary[@]}"
echo "  $(( SECONDS - start ))s wall in all, up to ${jobs} processes at a time"
exit "${status}"

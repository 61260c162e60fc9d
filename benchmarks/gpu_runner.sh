#!/usr/bin/env bash
# One run on an H200 machine, within a 10-minute job: install the packages, `panther info`, the GPU tests, then the
# gpu-quick benchmarks, each under its own `timeout` so that later steps still run and logs come back.
#
#   run from the repository root, with OUT set to an empty folder:
#     PANTHER_COMMIT=<short sha> bash benchmarks/gpu_runner.sh
#
# $OUT receives runner.log (everything), junit-gpu-only.xml and junit-rest.xml (tests), and the
# benchmark's <date>_<device>_<commit>.json with one PNG per op (with TOOLS_S > 0 also the triton tools'
# profile and plan timings; with CUDA_TOOLS_S > 0 the cuda backend's sweeps, linear_sweep.json and
# conv_sweep.json: every launch plan and kernel family timed in CUDA graphs, with each kernel's time).
# Worst case 45+20+250+250+30 s (replot after a cut-short benchmark), under the 10-minute call;
# TOOLS_S > 0 or CUDA_TOOLS_S > 0 needs the other limits lowered to stay under it.
set -u
: "${OUT:?set OUT to an empty folder}"
export PYTHONUNBUFFERED=1
# PANTHER_COMMIT, where given, names the tree in every result (the device's copy may carry a stale .git);
# unset, the benchmark reads git (and records whether the tree had changes)
INSTALL_S=${INSTALL_S:-45} INFO_S=${INFO_S:-20} TESTS_S=${TESTS_S:-250} BENCH_S=${BENCH_S:-250}  # TESTS_S=0: no tests; BENCH_S=0: no benchmarks
TEST_WORKERS=${TEST_WORKERS:-4}  # pytest-xdist processes for the GPU tests, where xdist is installed (1: none)
TOOLS_S=${TOOLS_S:-0}  # > 0: also the triton tools (host overhead per call, launch plans timed from CUDA graphs)
CUDA_TOOLS_S=${CUDA_TOOLS_S:-0}  # > 0: also the cuda backend's sweeps (linear_sweep --quick, conv_sweep --compiled), half each
BENCH_ARGS=${BENCH_ARGS:---preset gpu-quick --max-minutes 3.5}  # last case starts by 210 s  # e.g. "--preset gpu --filter rfa_attention --max-minutes 7"
shopt -s nullglob

step() { echo; echo "=== $* [$(date -u +%H:%M:%S) UTC]"; }

{
  step "machine (commit ${PANTHER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown) from git})"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
  python3 -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'

  step "install (limit ${INSTALL_S}s)"
  pkgs=(-e packages/panther-core -e packages/panther-nn -e tests/plugins/healthy -e tests/plugins/broken)
  for p in panther-triton panther-cuda; do
    if [ -d "packages/$p" ]; then pkgs+=(-e "packages/$p"); else echo "packages/$p absent: not installed"; fi
  done
  timeout -k 5 "$INSTALL_S" python3 -m pip install -q --no-deps --no-build-isolation "${pkgs[@]}"
  echo "install rc=$?"

  step "python3 -m panther info (limit ${INFO_S}s)"
  timeout -k 5 "$INFO_S" python3 -m panther info -v
  echo "info rc=$?"

  if [ "$TESTS_S" -gt 0 ]; then
    step "GPU tests (limit ${TESTS_S}s)"
    # Two runs sharing the slot: the GPU-only files (real sizes, bf16/tf32, Inductor) first, then everything
    # else marked gpu, so that a slot that runs out cuts the ragged-shape kernel tests, which the
    # interpreter also runs in CI. -v puts each result in the log as it comes.
    # Hypothesis examples per conformance test: every example is a new shape, which Triton tunes (and may
    # compile) on first use; the explicit ragged / one-row / 3-D examples always run.
    export PANTHER_CONFORMANCE_EXAMPLES=${PANTHER_CONFORMANCE_EXAMPLES:-10} PANTHER_REQUIRE_GPU=1
    gpu_only=(packages/*/tests/test_gpu.py tests/nn/test_gpu.py)
    ignore=(); for f in "${gpu_only[@]}"; do ignore+=(--ignore "$f"); done
    # First-use tuning and compilation, most of the slot, is CPU work: with pytest-xdist present, TEST_WORKERS
    # processes share the GPU (the timings autotuning sees get noisier; the results checked do not change).
    xdist=()
    if [ "$TEST_WORKERS" -gt 1 ] && python3 -c "import xdist" 2>/dev/null; then xdist=(-n "$TEST_WORKERS"); fi
    pytest_gpu=(python3 -m pytest -v -m gpu --import-mode=importlib -p no:cacheprovider --durations=10 "${xdist[@]}")
    t0=$(date +%s)
    timeout -k 10 "$TESTS_S" "${pytest_gpu[@]}" --junitxml="$OUT/junit-gpu-only.xml" "${gpu_only[@]}"
    echo "tests (GPU-only files) rc=$? (124: timed out)"
    left=$((TESTS_S - ($(date +%s) - t0)))
    if [ "$left" -gt 15 ]; then
      timeout -k 10 "$left" "${pytest_gpu[@]}" --junitxml="$OUT/junit-rest.xml" "${ignore[@]}" tests packages/*/tests
      echo "tests (the rest, limit ${left}s) rc=$? (5: no test collected; 124: timed out)"
    else
      echo "tests (the rest): no time left in the slot"
    fi
  fi

  if [ "$TOOLS_S" -gt 0 ] && [ -d packages/panther-triton ]; then
    step "triton tools (limit ${TOOLS_S}s)"
    tools=packages/panther-triton/tools
    timeout -k 5 "$TOOLS_S" bash -c "python3 $tools/host_overhead.py --T 128 --features 1024 --profile '$OUT/host-overhead-profile.txt' --trace '$OUT/host-trace' &&
      python3 $tools/host_overhead.py --T 4096 --features 8192 &&
      python3 $tools/check_gpu.py --plans --quick --json '$OUT/triton-plans.json'"
    echo "tools rc=$? (124: timed out)"
  fi

  if [ "$CUDA_TOOLS_S" -gt 0 ] && [ -d packages/panther-cuda ]; then
    step "cuda tools (limit ${CUDA_TOOLS_S}s, half each)"
    tools=packages/panther-cuda/tools
    timeout -k 5 $((CUDA_TOOLS_S / 2)) python3 $tools/conv_sweep.py --compiled --out "$OUT/conv_sweep.json"
    echo "conv_sweep rc=$? (124: timed out)"
    timeout -k 5 $((CUDA_TOOLS_S / 2)) python3 $tools/linear_sweep.py --quick --out "$OUT/linear_sweep.json"
    echo "linear_sweep rc=$? (124: timed out; the JSON holds every shape finished before)"
  fi

  if [ "$BENCH_S" -gt 0 ]; then
    step "benchmarks ${BENCH_ARGS} (limit ${BENCH_S}s)"
    read -r -a bench_args <<< "$BENCH_ARGS"  # split on spaces, no globbing (nullglob would drop a --filter regex)
    timeout -k 10 "$BENCH_S" python3 benchmarks/run.py "${bench_args[@]}" --out "$OUT"
    rc=$?
    echo "bench rc=$rc (124: timed out; the JSON holds every case finished before)"
    if [ "$rc" -ne 0 ]; then  # the plots are drawn at the end of a run: draw them from what the JSON holds
      for json in "$OUT"/*.json; do
        [ "$(basename "$json")" = triton-plans.json ] || timeout -k 5 30 python3 benchmarks/replot.py "$json"
      done
    fi
  fi

  step "done"
  ls -l "$OUT"
} 2>&1 | tee "$OUT/runner.log"

#!/usr/bin/env bash
# The short GPU session: what to run first when a GPU is lent for a few minutes, most important
# first, each step under its own time limit so a slow one cannot eat the rest. Results go to $OUT
# (default benchmarks/results/gpu-checks); commit them with the GPU's name.
#
#   bash benchmarks/gpu_checks.sh                                  # with network: installs ".[test]"
#   WHEELS=.whl bash benchmarks/gpu_checks.sh                      # offline: extra wheels carried in .whl/
#   STEPS=tests,advantages bash benchmarks/gpu_checks.sh           # a subset
#   SKIP_INSTALL=1 STEPS=bench,tune bash benchmarks/gpu_checks.sh  # more, already installed
#
# All steps fit one 10-minute command on an H200-class machine (install ~1 min, tests ~1.5 min; the
# limits below sum to ~10.5 min, but with DEADLINE every step's limit is cut to what is left, and
# only a hung step reaches its limit).
# steps, run in the order STEPS names them (default: all but core, in this order):
#   tests       op tests on CUDA: SDE step (incl. direct launch, sync-debug, CUDA graphs), advantages
#               (CUDA engine == its host emulation, bit for bit), Flow-GRPO compat, the stores' rounding
#               (kernels/_rounding.py == torch's casts); then the fused
#               transformer ops (norms, block tails, QK-norm + rotation, LoRA linear; whole fused SD3.5-M /
#               FLUX.1 / FLUX.2-architecture transformers vs diffusers)
#   advantages  advantage engine: eager call vs CUDA-graph replay, its kernels, host time breakdown
#   advbase     (not in the default list) the same for the BASELINE build (below), for an A/B
#   norms       fused transformer norms (adaLN modulation, QK RMSNorm, block tail) and fused LoRA linear: a
#               real-size SD3.5-M forward and backward with them vs diffusers' modules (and with LoRA r32
#               under bf16 autocast vs peft's layers), then each op vs eager (issue 9)
#   tune        launch-knob sweep of the SDE-step kernels (kernel-only bandwidth per variant); its
#               winner (SFGRPO_SDE_STEP_TUNING) is exported for the steps after it
#   bench       SDE-step benchmark --quick (latency, back-to-back, GPU-only graph replay; vs eager,
#               torch.compile, Flow-GRPO); rows are saved as they are measured
#   trainer     the trainer on CUDA (its update must not synchronise; bf16, fp16, KL, minibatches) and
#               the diffusers backbones' CUDA tests (sync-free velocities, offloaded text encoders)
#   normsweep   (not in the default list) the fused norms' row chunking: GPU-only times of the modulation
#               and residual + norm2 kernels per (MIN_ROWS, TARGET_PROGRAMS) setting (~1 min)
#   ncu         (not in the default list) Nsight Compute on the advantage engine's 1M-gain call: each
#               kernel's throughput, occupancy and warp stalls (~1 min)
#   core        (not in the default list) issue 9's goals on real-size SD3.5-M,
#               `sfgrpo bench --suite gpu-core --time-budget 240` under `timeout -k 10 300` (~4-5 min on an
#               H100; rows are printed and saved as they are measured, a killed run keeps them), then
#               fed to check_goals.py --bench:  SKIP_INSTALL=1 STEPS=core bash benchmarks/gpu_checks.sh
#
# A session with 15 minutes of device time (machine start included: ~40 s on an H100), most valuable
# first. Issue 9's goals were met on an H200 (2026-11-26, results/gpu-checks-NVIDIA_H200); the advantage
# engine was profiled (ncu) and A/B'd on an H100 (2026-11-27, results/gpu-checks-NVIDIA_H100_80GB_HBM3-
# 2026-11-27). Open: why the fused norms slow a plain-bf16 SD3.5-M (norms --profile, never run yet),
# the fused-op tests cut short by their limit (the flux1 torch.compile test), the SDE-step bench and
# tuning on the current code:
#   call 1 (timeout 590 s): DEADLINE=560 WHEELS=.whl STEPS=tests,norms,tune,bench bash benchmarks/gpu_checks.sh
#   the advantage engine's rows staged in shared memory (cp.async, read by every phase of the single
#   launch), phase 2b (per-step statistics once per group), ranges read in chunks and a cheaper
#   statistics chain (2026-11-27, same bits, never run on a GPU): A/B against 871f2a8, the last measured
#   state (per_step was 106.9 us of kernel time, joint 32.7-31.5; the bench's "rows not staged" rows
#   are the same build with SFGRPO_ADVANTAGES_STAGE_ROWS=0: the stage's own share), the CUDA-engine tests with it
#   (tests/test_advantages_cuda_engine.py: CUDA == emulation), then `STEPS=ncu` if time is left;
#   an engine change: `git archive -o .whl/baseline.tar <old commit>`, then
#   DEADLINE=140 WHEELS=.whl BASELINE=.whl/baseline.tar STEPS=advantages,advbase bash benchmarks/gpu_checks.sh
#   (both builds run in parallel before any step: ~110 s in all on an H100)
# The device has no diffusers: .whl/ holds diffusers 0.42.1 and importlib_metadata wheels (pip download
# as the device tool's README says, `echo /.whl/ >> .git/info/exclude`), carried with the call.
# (DEADLINE cuts each step's limit to what is left of the command, core's included.)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=$(realpath -m "${OUT:-$REPO/benchmarks/results/gpu-checks}")  # absolute: the steps run from /tmp
STEPS="${STEPS:-tests,advantages,norms,tune,bench,trainer}"
mkdir -p "$OUT"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 1
# BASELINE=<source tarball> (`git archive -o .whl/baseline.tar <commit>`, carried with .whl): that
# version is built into /tmp/sfgrpo-baseline next to this install, and step `advbase` times its
# advantage engine: a change to the engine A/B'd in one run on one GPU. Both builds finish before
# any step runs (nvcc in the background would skew the host timings).
BASELINE_SITE=/tmp/sfgrpo-baseline
baseline_pid=""
if [ -n "${BASELINE:-}" ]; then
  baseline_tar=$(realpath "$BASELINE")
  ( rm -rf /tmp/sfgrpo-baseline-src "$BASELINE_SITE" && mkdir -p /tmp/sfgrpo-baseline-src \
      && tar xf "$baseline_tar" -C /tmp/sfgrpo-baseline-src \
      && SFGRPO_CUDA_ARCHS=${SFGRPO_CUDA_ARCHS:-90} python3 -m pip install -q --no-index --no-build-isolation \
           --no-deps --target "$BASELINE_SITE" /tmp/sfgrpo-baseline-src ) > "$OUT/baseline_build.txt" 2>&1 &
  baseline_pid=$!
fi
if [ -n "${SKIP_INSTALL:-}" ]; then
  :
elif [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
  SFGRPO_CUDA_ARCHS=${SFGRPO_CUDA_ARCHS:-90} python3 -m pip install -q --no-index --no-build-isolation --no-deps . || exit 1
else
  python3 -m pip install -q ".[test]" || exit 1
fi
# a step's time limit: its own, cut to what is left before DEADLINE (seconds since the start, minus
# 20 s for the goals table), so overrunning steps cannot push the whole command past its limit
limit() {
  local left=$(( ${DEADLINE:-100000} - SECONDS - 20 ))
  (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"
}
if [ -n "$baseline_pid" ]; then
  wait "$baseline_pid"
  echo "baseline build: exit $? ($(tail -1 "$OUT/baseline_build.txt" 2>/dev/null))"
fi
cd /tmp  # run against the installed package, never the source tree
sfgrpo info > "$OUT/info.txt" 2>&1
# pytest-xdist workers where it is installed: the fused-op tests compile hundreds of Triton
# specialisations, CPU-bound (one process took > 150 s for them on an H200's host, 2026-11-26)
XDIST=""
python3 -c "import xdist" 2> /dev/null && XDIST="-n ${TEST_WORKERS:-8} --dist loadfile"  # a file's tests in order, in one worker
step_tests() {
  # no -x: one short GPU session should show every failure, not the first. Two runs, each under its
  # own limit, so that a slow second half (many kernel specialisations to compile) cannot cost the
  # first half's summary: the SDE step, advantages and compat; then the fused transformer ops.
  # -v: one line per test, so a run cut short by its limit still names the tests that failed. The
  # second half took > 150 s with 8 workers on an H100 (2026-11-27: cut at its last tests, the
  # torch.compile'd FLUX.1 architecture), hence 210 s
  timeout -k 10 $(limit 120) python3 -m pytest -v -rfE $XDIST --maxfail=25 -p no:cacheprovider "$REPO/tests/test_sde_step_op.py" \
    "$REPO/tests/test_triton_launch.py" "$REPO/tests/test_advantages.py" "$REPO/tests/test_advantages_cuda_engine.py" \
    "$REPO/tests/test_compat_flow_grpo.py" "$REPO/tests/test_rounding.py" > "$OUT/tests.txt" 2>&1
  echo "tests: exit $? ($(tail -1 "$OUT/tests.txt"))"
  timeout -k 10 $(limit 210) python3 -m pytest -v -rfE $XDIST --maxfail=25 -p no:cacheprovider "$REPO/tests/test_rms_norm.py" \
    "$REPO/tests/test_qk_norm_rope.py" "$REPO/tests/test_layer_norm_modulate.py" "$REPO/tests/test_gated_residual.py" \
    "$REPO/tests/test_fused_norms.py" "$REPO/tests/test_lora_linear.py" > "$OUT/tests_fused_ops.txt" 2>&1
  echo "fused-op tests: exit $? ($(tail -1 "$OUT/tests_fused_ops.txt"))"
}
advantages_bench() {
  # bench_advantages --gpu-only into $OUT/<name>.md, the package the caller's environment imports
  local name=$1
  timeout -k 10 $(limit 60) python3 "$REPO/benchmarks/bench_advantages.py" --gpu-only --out "$OUT/$name.md" > /dev/null 2> "$OUT/bench_$name.err"
  echo "$name bench: exit $?"
  cat "$OUT/$name.md" 2>/dev/null
}
step_advantages() {
  advantages_bench advantages
}
step_advbase() {
  # the advantage engine of the BASELINE build (see above), same benchmark, same GPU, same run
  if [ ! -d "$BASELINE_SITE/sfgrpo" ]; then echo "advantages baseline: no BASELINE build"; return; fi
  PYTHONPATH="$BASELINE_SITE" advantages_bench advantages_baseline
}
step_norms() {
  # the fused transformer norms: ops vs diffusers' eager expressions and torch.compile, and what they
  # (and, with LoRA adapters, the fused LoRA linear) buy a real-size SD3.5-M forward / backward against
  # diffusers' modules and peft's layers, in one run
  timeout -k 10 $(limit 150) python3 "$REPO/benchmarks/bench_norms_gpu.py" --quick --profile --out "$OUT" > "$OUT/bench_norms.txt" 2>&1
  echo "norms bench: exit $?"
  tail -n 20 "$OUT/bench_norms.txt"
}
step_normsweep() {
  # the modulation / residual+norm2 kernels' row chunking (rows per program, programs per launch):
  # GPU-only time per setting, for their defaults (their forward streamed at 44 % of copy bandwidth)
  timeout -k 10 $(limit 90) python3 "$REPO/benchmarks/bench_norms_gpu.py" --sweep --quick --out "$OUT" \
    > "$OUT/bench_norms_sweep.txt" 2>&1
  echo "norms sweep: exit $?"
  grep -E "sweep" "$OUT/bench_norms_sweep.txt" | head -n 70
}
step_ncu() {
  # Nsight Compute on the advantage engine's 1M-gain call (issue 5: 36 us of GPU time for 8.4 MB):
  # every section of each kernel (the cooperative one and each phase's, scattered groups then
  # groups side by side), then the warp-stall samples per SASS instruction of the phases' kernels
  if ! command -v ncu > /dev/null; then echo "ncu: not installed"; return; fi
  timeout -k 10 $(limit 120) ncu --clock-control none --set full --import-source no \
    -k regex:'single_launch|warp_rows|write_kernel' \
    python3 "$REPO/benchmarks/ncu_advantages.py" --calls 1 --layouts permuted,sorted > "$OUT/ncu_advantages.txt" 2>&1
  echo "ncu advantages: exit $?"
  grep -E "^  [a-zA-Z_:<>(), ]+\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Executed Ipc A|Issue Slots Busy" \
    "$OUT/ncu_advantages.txt" | head -n 80
  # per-instruction stall samples (the hot SASS lines) of the permuted layout's phase kernels
  timeout -k 10 $(limit 90) ncu --clock-control none --section SourceCounters --section WarpStateStats \
    --import-source no --page source --print-source sass --csv -k regex:'warp_rows|write_kernel' -c 3 \
    python3 "$REPO/benchmarks/ncu_advantages.py" --calls 0 --layouts permuted > "$OUT/ncu_advantages_sass.csv" 2>&1
  echo "ncu sass: exit $? ($(wc -l < "$OUT/ncu_advantages_sass.csv") lines)"
}
step_tune() {
  # before the benchmarks: they run with the sweep's winner (SFGRPO_SDE_STEP_TUNING, read at import);
  # a winner left in $OUT by an earlier run must not be exported when this sweep names none
  rm -f "$OUT/tuning_winner.txt"
  timeout -k 10 $(limit 120) python3 "$REPO/benchmarks/tune_sde_step_gpu.py" --quick --out "$OUT/tuning.md" \
    --winner-out "$OUT/tuning_winner.txt" > /dev/null 2> "$OUT/tuning.err"
  echo "tuning: exit $?"
  head -n 40 "$OUT/tuning.md" 2>/dev/null
  if [ -s "$OUT/tuning_winner.txt" ]; then
    export SFGRPO_SDE_STEP_TUNING=$(cat "$OUT/tuning_winner.txt")
    echo "SDE-step launch knobs from here on: $SFGRPO_SDE_STEP_TUNING"
  fi
}
step_bench() {
  timeout -k 10 $(limit 150) python3 "$REPO/benchmarks/bench_sde_step_gpu.py" --quick --out "$OUT" > "$OUT/bench_sde_step.txt" 2>&1
  echo "sde-step bench: exit $?"
  tail -n 40 "$OUT/bench_sde_step.txt"
  # where a back-to-back call's host time goes (sfgrpo's Python vs Triton's launcher vs one torch op)
  rm -f "$OUT/host_breakdown.md"  # written row by row: what this run measured, nothing older
  timeout -k 10 $(limit 60) python3 "$REPO/benchmarks/host_breakdown_gpu.py" --out "$OUT/host_breakdown.md" > /dev/null 2> "$OUT/host_breakdown.err"
  echo "host breakdown: exit $?"
  cat "$OUT/host_breakdown.md" 2>/dev/null
}
step_trainer() {
  timeout -k 10 $(limit 90) python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_trainer.py" "$REPO/tests/test_pipelines.py" -k cuda > "$OUT/tests_trainer_cuda.txt" 2>&1
  echo "trainer on CUDA: exit $? ($(tail -1 "$OUT/tests_trainer_cuda.txt"))"
}
step_core() {
  # the budget stops starting new rows after 240 s (sfgrpo and the reference ops on both cases come
  # first); `timeout` is the hard stop for a row that overruns its estimate. With DEADLINE (seconds
  # since this script started, e.g. 560 inside a 590 s command), both shrink to what is left.
  local left=$(( ${DEADLINE:-100000} - SECONDS - 15 ))
  local hard=$(( left < 300 ? left : 300 ))
  if (( hard < 120 )); then
    echo "gpu-core bench: skipped (${left} s left before DEADLINE=${DEADLINE:-})"
  else
    timeout -k 10 "$hard" sfgrpo bench --suite gpu-core --time-budget $(( hard - 60 )) --no-progress \
      --output-dir "$OUT/bench-gpu-core" > "$OUT/bench_gpu_core.txt" 2>&1
    echo "gpu-core bench: exit $? (hard limit ${hard} s)"
    grep -E ": (ok|skipped|interrupted|failed|oom)" "$OUT/bench_gpu_core.txt" | tail -n 12
  fi
}
IFS=, read -ra step_list <<< "$STEPS"  # no word splitting or globbing of the names
declare -A done_steps=()
for step in "${step_list[@]}"; do  # in the order given, each once
  [ -n "$step" ] && [ -z "${done_steps[$step]:-}" ] || continue
  done_steps[$step]=1
  if declare -F "step_$step" > /dev/null; then
    "step_$step"
  else
    echo "unknown step '$step' (known: $(declare -F | sed -n 's/^declare -f step_//p' | paste -sd' '))"
  fi
done
# the goals of issues 4, 5 and 9 against what the steps above measured (each input is optional)
sde_json=$(ls "$OUT"/sde_step_*.json 2>/dev/null | head -n 1)
core_json="$OUT/bench-gpu-core/results.json"
[ -f "$core_json" ] || core_json=""
python3 "$REPO/benchmarks/check_goals.py" ${sde_json:+--sde-step "$sde_json"} --advantages "$OUT/advantages.md" \
  ${core_json:+--bench "$core_json"} --out "$OUT/goals.md"
echo "goals: exit $?"

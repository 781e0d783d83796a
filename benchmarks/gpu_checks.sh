#!/usr/bin/env bash
# The short GPU session: what to run first when a GPU is lent for a few minutes, most important
# first, each step bounded so a slow one cannot eat the rest. Results go to $OUT (default
# benchmarks/results/gpu-checks); commit them with the GPU's name.
#
#   bash benchmarks/gpu_checks.sh                      # with network: installs ".[test]"
#   WHEELS=.whl bash benchmarks/gpu_checks.sh          # offline: extra wheels carried in .whl/
#
# 1. op tests on CUDA (SDE step incl. direct launch, sync-debug, CUDA graphs; advantages; compat),
#    and the trainer on CUDA (its update must not synchronise)
# 2. SDE-step benchmark --quick (latency, back-to-back, GPU-only graph replay, vs eager/compile/Flow-GRPO)
# 3. advantage engine on the GPU (eager call vs graph replay)
# 4. launch-knob sweep of the SDE-step kernels (kernel-only bandwidth per variant)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/benchmarks/results/gpu-checks}
mkdir -p "$OUT"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 1
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
  SFGRPO_CUDA_ARCHS=${SFGRPO_CUDA_ARCHS:-90} python3 -m pip install -q --no-index --no-build-isolation --no-deps . || exit 1
elif [ -z "${SKIP_INSTALL:-}" ]; then
  python3 -m pip install -q ".[test]" || exit 1
fi
cd /tmp  # run against the installed package, never the source tree
python3 -m sfgrpo info > "$OUT/info.txt" 2>&1 || sfgrpo info > "$OUT/info.txt" 2>&1
timeout 240 python3 -m pytest -q -x -p no:cacheprovider "$REPO/tests/test_sde_step_op.py" "$REPO/tests/test_triton_launch.py" \
  "$REPO/tests/test_advantages.py" "$REPO/tests/test_compat_flow_grpo.py" > "$OUT/tests.txt" 2>&1
echo "tests: exit $? ($(tail -1 "$OUT/tests.txt"))"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider "$REPO/tests/test_trainer.py" -k cuda > "$OUT/tests_trainer_cuda.txt" 2>&1
echo "trainer on CUDA: exit $? ($(tail -1 "$OUT/tests_trainer_cuda.txt"))"
timeout 240 python3 "$REPO/benchmarks/bench_sde_step_gpu.py" --quick --out "$OUT" > "$OUT/bench_sde_step.txt" 2>&1
echo "sde-step bench: exit $?"
timeout 90 python3 "$REPO/benchmarks/bench_advantages.py" --gpu-only --out "$OUT/advantages.md" > /dev/null 2> "$OUT/bench_advantages.err"
echo "advantages bench: exit $?"
timeout 200 python3 "$REPO/benchmarks/tune_sde_step_gpu.py" --quick --out "$OUT/tuning.md" > /dev/null 2> "$OUT/tuning.err"
echo "tuning: exit $?"
tail -n 30 "$OUT/bench_sde_step.txt"
cat "$OUT/advantages.md"
head -n 40 "$OUT/tuning.md" 2>/dev/null

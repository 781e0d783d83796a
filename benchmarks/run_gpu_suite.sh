#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: install, run the whole test suite on the GPU (the op
# tests switch to CUDA tensors and real Triton kernels when a GPU is present), then the kernel and
# advantage benchmarks. Results land in benchmarks/results/ named after the GPU; commit them.
#
#   bash benchmarks/run_gpu_suite.sh            # full suite
#   QUICK=1 bash benchmarks/run_gpu_suite.sh    # two shapes per benchmark
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
# SKIP_INSTALL=1 where nothing can be downloaded (install sfgrpo and its wheels by hand first)
[ -n "${SKIP_INSTALL:-}" ] || pip install -q ".[test]"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_').replace('/', '_'))")
mkdir -p benchmarks/results
sfgrpo info | tee "benchmarks/results/info_${gpu}.txt"
pytest -q -p no:cacheprovider 2>&1 | tee "benchmarks/results/tests_${gpu}.txt"
python benchmarks/bench_sde_step_gpu.py ${QUICK:+--quick} --out benchmarks/results
python benchmarks/bench_advantages.py ${QUICK:+--quick} --out "benchmarks/results/advantages_${gpu}.md"
python -m sfgrpo.kernels._aot > "benchmarks/results/aot_sm90.jsonl"
# the fused transformer ops and whole real-size transformers with them vs diffusers' modules
models=sd35m,flux1-dev
[ -z "${QUICK:-}" ] || models=sd35m
python benchmarks/bench_norms_gpu.py ${QUICK:+--quick} --models "$models" --out benchmarks/results
# training-loop benchmark: real-size SD3.5-M / FLUX.1-dev transformers, sfgrpo vs reference ops vs compile
# (rows are printed and saved as they are measured; on a short lease run only issue 9's goals instead:
# `timeout 300 sfgrpo bench --suite gpu-core --time-budget 240`, see benchmarks/gpu_checks.sh STEPS=core)
sfgrpo bench --suite gpu ${QUICK:+--cases sd35m} --output-dir "benchmarks/results/bench-gpu-${gpu}"
# the issues' goals, measured against their targets (exit status 1 when one is missed)
python benchmarks/check_goals.py --sde-step "benchmarks/results/sde_step_${gpu}.json" \
    --advantages "benchmarks/results/advantages_${gpu}.md" --bench "benchmarks/results/bench-gpu-${gpu}/results.json" \
    --out "benchmarks/results/goals_${gpu}.md" || true
echo "results in benchmarks/results/ (GPU: ${gpu})"

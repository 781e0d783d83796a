"""benchmarks/host_instructions.py builds every case it counts: the stubbed launch paths still run
end to end (a renamed internal would otherwise surface only when someone runs the benchmark under
valgrind). Its own process: the SDE-step cases need the Triton kernels compiled, not interpreted."""

import os
import subprocess
import sys

import benchmark_scripts


def test_every_case_runs_with_its_stubs():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, str(benchmark_scripts.BENCHMARKS / "host_instructions.py"), "--check"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    script = benchmark_scripts.load("host_instructions")
    assert done.stdout.splitlines() == [f"{case}: ok" for case in script.CASES]

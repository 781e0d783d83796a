"""`sfgrpo bench`: named benchmark suites of the training loop (rollout, look-ahead, update, whole
iteration) on the built-in backbone and on SD3.5-Medium / FLUX.1-dev transformers built from their
published configs with random weights; sfgrpo vs the plain-PyTorch reference ops vs torch.compile."""

from pathlib import Path

from sfgrpo.bench.measure import BackboneClock, SyncCounter
from sfgrpo.bench.suites import SUITES, Case, Suite, get_suite

__all__ = ["BackboneClock", "Case", "SUITES", "Suite", "SyncCounter", "check_arguments", "get_suite", "main", "run"]


def run(suite: str | Suite, output_dir: str, progress: bool = True, case_filter: str | None = None,
        device: str | None = None, time_budget: float | None = None) -> dict:
    """Runs a suite and writes its results folder; returns the written paths. The results files are
    rewritten after every row (plots at the end), so an interrupted run keeps what it measured."""
    from sfgrpo.bench.report import environment, write_results
    from sfgrpo.bench.runner import run_suite

    suite = get_suite(suite) if isinstance(suite, str) else suite
    if device:
        suite.device = device
    env = environment(suite.device, output_dir)  # once: git and the date of the run's start

    def save(rows):
        write_results(rows, suite.name, suite.device, output_dir, env=env, plots=False)

    rows = run_suite(suite, progress=progress, case_filter=case_filter, time_budget=time_budget, on_rows=save)
    return write_results(rows, suite.name, suite.device, output_dir, env=env)


def default_output_dir(suite: Suite) -> str:
    """benchmarks/results/<suite>-<device> (the GPU's name on CUDA)."""
    import re

    import torch

    if suite.device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = "cpu"
    return f"benchmarks/results/bench-{suite.name}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}"


def add_arguments(parser) -> None:
    parser.add_argument("--suite", default="cpu", choices=SUITES, help="cpu: small configs (minutes); "
                        "gpu: real-size SD3.5-M / FLUX.1-dev transformers (an hour or more); gpu-core: the SD3.5-M "
                        "Flow-GRPO and stepwise iterations, sfgrpo and the reference ops first, then Flow-GRPO's "
                        "code (minutes; on a short GPU lease: --time-budget 240); quick: seconds-long smoke run")
    parser.add_argument("--quick", action="store_true", help="the CPU smoke run (same as --suite quick)")
    parser.add_argument("--output-dir", help="results folder (default benchmarks/results/bench-<suite>-<device>)")
    parser.add_argument("--device", help="override the suite's device (e.g. cuda:1)")
    parser.add_argument("--cases", help="run only the cases whose name contains this text")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar (the timestamped phase "
                        "and result lines are printed on stdout either way)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="do not start a case x implementation whose estimated cost (the slowest finished "
                        "run of the same case, else the last one on the same backbone) would end past SECONDS "
                        "since the start: it is recorded as 'skipped (time budget)'. A run already started is "
                        "never cut, so leave a margin below a hard limit (e.g. --time-budget 240 under "
                        "`timeout 300`). Results are written after every row either way")


def check_arguments(args) -> None:
    """A ValueError naming a bad flag, before anything is built or written (an empty --cases match
    used to write a results folder with no rows; a bad --device, a traceback)."""
    import torch

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.time_budget is not None and not args.time_budget >= 0:  # 0: every run recorded as skipped
        raise ValueError(f"--time-budget must be a number of seconds >= 0, got {args.time_budget}")
    if args.device:
        try:
            torch.device(args.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"--device {args.device!r} is not a torch device ({err})") from None
    suite = get_suite("quick" if args.quick else args.suite)
    if args.cases and not any(args.cases in case.name for case in suite.cases):
        raise ValueError(f"--cases {args.cases!r} matches no case of suite {suite.name!r}: "
                         f"{', '.join(case.name for case in suite.cases)}")


def main(args) -> int:
    import signal
    import threading

    import torch

    check_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = get_suite("quick" if args.quick else args.suite)
    if args.device:
        suite.device = args.device
    if suite.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"sfgrpo bench: suite {suite.name!r} needs a CUDA device; use --suite cpu (or --quick)")
    output_dir = args.output_dir or default_output_dir(suite)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (`timeout`, a scheduler) as an exception: the runner records the interrupted row and
        # the results files keep everything measured before it
        def terminate(signum, _frame):
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, terminate)
    try:
        paths = run(suite, output_dir, progress=not args.no_progress, case_filter=args.cases,
                    time_budget=args.time_budget)
    except (KeyboardInterrupt, SystemExit):
        print(f"sfgrpo bench: interrupted; the rows measured so far are in {output_dir}", flush=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(Path(paths["md"]).read_text())
    print(f"results in {output_dir}: " + ", ".join(p.name for p in paths.values()))
    return 0

"""`sfgrpo` console entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from sfgrpo import info

    report = info.collect()
    print(json.dumps(report, indent=2, default=str) if args.json else info.format_report(report))
    return 0


def _usage_error(args: argparse.Namespace, err: Exception):
    """A bad argument: one line on stderr with argparse's exit status 2, not a traceback."""
    print(f"sfgrpo {args.command}: error: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def _checked_config(args: argparse.Namespace):
    """The command's TrainerConfig, validated before the backbone loads, its reward spec resolved
    (an unknown reward name, a reward model path that does not exist: the trainer reuses what is
    resolved here, rewards are cached by spec) and a --resume-from directory checked (`latest`
    without a checkpoint yet is the trainer's fresh start, with its warning)."""
    from sfgrpo.rewards import get_reward
    from sfgrpo.trainer import checkpoint
    from sfgrpo.trainer.cli_args import config_from_args

    try:
        config = config_from_args(args).validate().check_device()
        get_reward(config.reward)
        if config.resume_from is not None and config.resume_from != checkpoint.LATEST:
            checkpoint.resolve_checkpoint(config.resume_from, Path(config.output_dir) / "checkpoints")
        return config
    except (ValueError, OSError, ImportError) as err:  # the config's own errors; a missing --config file
        _usage_error(args, err)


def _trainer(args: argparse.Namespace, config):
    """The command's Trainer; a config error that needs the backbone to show (its sampling grid, a
    guidance-distilled checkpoint asked for CFG) is a one-line usage error too."""
    from sfgrpo.trainer import Trainer

    try:
        return Trainer(config)
    except ValueError as err:
        if str(err).startswith("bad trainer config"):
            _usage_error(args, err)
        raise


def _cmd_train(args: argparse.Namespace) -> int:
    from sfgrpo import distributed

    config = _checked_config(args)
    # under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set): one process group, NCCL on CUDA, gloo on CPU
    ctx = distributed.init_from_env(config.device)
    try:
        history = _trainer(args, config).train()
    finally:
        distributed.shutdown()
    if ctx.is_main:
        if history:
            last = history[-1]
            summary = {k: last[k] for k in ("iteration", "reward_mean", "class_accuracy") if k in last}
            print(json.dumps(summary))
        print(f"outputs in {config.output_dir}" + (f" ({ctx.world_size} processes)" if ctx.enabled else ""))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from sfgrpo import distributed

    config = _checked_config(args)
    ctx = distributed.init_from_env(config.device)
    try:
        record = _trainer(args, config).evaluate()  # the weights of --resume-from (or the starting ones)
    finally:
        distributed.shutdown()
    if ctx.is_main:
        print(json.dumps(record))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from sfgrpo.trainer.export import check_export, export_weights

    config = _checked_config(args)
    use_ema = {"auto": None, "ema": True, "trained": False}[args.weights]
    try:
        check_export(config, use_ema)  # before the backbone loads
    except ValueError as err:
        _usage_error(args, err)
    trainer = _trainer(args, config)  # loads --resume-from
    try:
        written = export_weights(trainer, args.export_dir, use_ema=use_ema)
    except ValueError as err:  # what only the loaded backbone shows (a 'module:factory' one without a pipeline)
        if str(err).startswith("cannot export"):
            _usage_error(args, err)
        raise
    print(f"iteration {trainer.iteration}: wrote {written}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sfgrpo import demo

    try:
        planned = demo.plan(args)
    except (ValueError, OSError, ImportError) as err:
        _usage_error(args, err)
    return demo.main(args, planned)


def _cmd_bench(args: argparse.Namespace) -> int:
    from sfgrpo import bench

    try:
        bench.check_arguments(args)
    except ValueError as err:
        _usage_error(args, err)
    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfgrpo", description="Stepwise-Flow-GRPO engine")
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="versions, native build, GPU and backend per op")
    info_parser.add_argument("--json", action="store_true", help="machine-readable output")
    info_parser.set_defaults(func=_cmd_info)

    from sfgrpo.trainer.cli_args import add_config_arguments

    def config_command(name: str, func, help_text: str, description: str) -> argparse.ArgumentParser:
        """A subcommand that takes every TrainerConfig field as a flag (and --config FILE)."""
        command = sub.add_parser(name, help=help_text, description=description)
        add_config_arguments(command)
        command.set_defaults(func=func)
        return command

    config_command(
        "train", _cmd_train, "fine-tune with Stepwise-Flow-GRPO or Flow-GRPO",
        "Fine-tune a flow model with Stepwise-Flow-GRPO (--mode stepwise) or Flow-GRPO "
        "(--mode flow_grpo). Every flag is a TrainerConfig field; --config FILE (JSON/YAML) sets many at once.")
    config_command(
        "evaluate", _cmd_evaluate, "score a checkpoint (or the starting weights) with the evaluation protocol",
        "Evaluates the weights of --resume-from (a checkpoint directory, or 'latest' in --output-dir; "
        "none: the starting weights) like --eval-every does during training: --eval-num-steps ODE steps from "
        "fixed noise, --eval-prompts / --eval-prompt-file (else the training prompts), EMA weights when the "
        "run has them. Prints the record and appends it to OUTPUT_DIR/eval.jsonl. Takes every train flag; "
        "--config run/config.json reuses a run's settings.")
    export_parser = config_command(
        "export", _cmd_export, "write a checkpoint's weights for diffusers (LoRA file or transformer folder)",
        "Exports the weights of --resume-from (a checkpoint directory, or 'latest' in --output-dir) "
        "in a diffusers format: LoRA runs -> EXPORT_DIR/pytorch_lora_weights.safetensors for "
        "pipe.load_lora_weights(EXPORT_DIR); full fine-tunes -> EXPORT_DIR/transformer (config + safetensors "
        "in --model-dtype) for <Transformer>.from_pretrained. --config run/config.json reuses a run's settings.")
    export_parser.add_argument("--export-dir", required=True, help="where to write the weights")
    export_parser.add_argument("--weights", choices=("auto", "ema", "trained"), default="auto",
                               help="auto: the EMA weights when the run keeps an EMA, else the trained ones")

    from sfgrpo import demo

    demo_parser = sub.add_parser("demo", help="stepwise vs Flow-GRPO on the built-in digits model (offline, CPU)",
                                 description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=_cmd_demo)

    from sfgrpo import bench

    bench_parser = sub.add_parser("bench", help="benchmark suites: sfgrpo vs reference ops vs torch.compile",
                                  description=bench.__doc__)
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""`sfgrpo` console entry point."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from sfgrpo import info

    report = info.collect()
    print(json.dumps(report, indent=2, default=str) if args.json else info.format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sfgrpo", description="Stepwise-Flow-GRPO engine")
    sub = parser.add_subparsers(dest="command", required=True)
    info_parser = sub.add_parser("info", help="versions, native build, GPU and backend per op")
    info_parser.add_argument("--json", action="store_true", help="machine-readable output")
    info_parser.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

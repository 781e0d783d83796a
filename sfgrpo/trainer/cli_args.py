"""argparse flags generated from `TrainerConfig`'s fields, so the flags and the dataclass cannot
drift apart. Flags default to "not given" so that a `--config` file's values are only overridden
by flags that were actually passed."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from sfgrpo.trainer.config import TrainerConfig


def _none_or(kind):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainerConfig)
    parser.add_argument("--config", help="JSON or YAML file with TrainerConfig fields; flags override it")
    for field in dataclasses.fields(TrainerConfig):
        hint = hints[field.name]
        optional = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
        flag = "--" + field.name.replace("_", "-")
        help_text = f"{field.metadata.get('help', '')} (default: {field.default})"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parse = _none_or(base) if optional else base
            parser.add_argument(flag, type=parse, default=argparse.SUPPRESS, help=help_text,
                                metavar=field.name.upper())


def config_from_args(args: argparse.Namespace) -> TrainerConfig:
    names = {f.name for f in dataclasses.fields(TrainerConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "config", None):
        return TrainerConfig.from_file(args.config, **given)
    return TrainerConfig(**given)

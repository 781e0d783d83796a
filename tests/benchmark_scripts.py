"""The scripts of benchmarks/ as modules (they are scripts, not a package), for the tests that check
what they compute."""

import importlib.util
import pathlib
import sys
from types import ModuleType

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str, *, register: bool = False) -> ModuleType:
    """benchmarks/<name>.py, executed as module `name`; `register`: also in sys.modules (dataclasses
    look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

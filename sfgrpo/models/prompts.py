"""Prompt files for real backbones, and prompts that carry metadata for their reward.

A prompt file is one prompt per line (blank lines and `#` comments skipped), a JSON list (`.json`),
or JSON lines (`.jsonl`, Flow-GRPO's `*_metadata.jsonl` layout). A JSON entry is a string or an
object whose "prompt" is the text and whose other fields are the prompt's metadata (GenEval's
objects and counts, an OCR target, ...). Prompts are `Prompt` strings: everything that takes text
takes them unchanged, and a reward function that needs the metadata reads `prompt.metadata`.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path


class Prompt(str):
    """A prompt's text (it *is* the string) with the metadata its reward may need."""

    metadata: dict

    def __new__(cls, text: str, metadata: dict | None = None):
        prompt = super().__new__(cls, text)
        prompt.metadata = dict(metadata or {})
        return prompt

    def __reduce__(self):  # pickles (multiprocessing, torch.save) with its metadata
        return (Prompt, (str(self), self.metadata))

    def __repr__(self) -> str:
        return f"Prompt({str(self)!r}, {self.metadata!r})" if self.metadata else super().__repr__()


def metadata_of(prompt) -> dict:
    """A prompt's metadata ({} for a plain string)."""
    return getattr(prompt, "metadata", {})


def _entry(value, where: str) -> Prompt:
    if isinstance(value, str):
        return Prompt(value)
    if isinstance(value, dict) and isinstance(value.get("prompt"), str):
        return Prompt(value["prompt"], {k: v for k, v in value.items() if k != "prompt"})
    raise ValueError(f"{where}: a prompt entry must be a string or an object with a string \"prompt\", "
                     f"got {json.dumps(value)[:80]}")


def read_prompt_file(path: str) -> list[Prompt]:
    """The prompts of a .txt (one per line, `#` comments), .json (a list) or .jsonl file; strings or
    objects with a "prompt" (the rest is the prompt's metadata). A fresh list of fresh prompts on
    every call (the parsed file is cached): callers may change what they get."""
    return [Prompt(str(p), copy.deepcopy(p.metadata)) for p in _read_prompt_file(path)]


def cached_prompt_file(path: str) -> list[Prompt]:
    """`read_prompt_file` without the copies, for the trainer's per-iteration draws (a fresh list;
    the prompts themselves are the cache's: read them, do not change their metadata)."""
    return list(_read_prompt_file(path))


def _lines(text: str) -> list[str]:
    # only "\n" (and "\r\n") ends a line: str.splitlines also splits on U+2028, U+0085, form feeds...
    # which JSON text and prompts may contain
    return [line.removesuffix("\r") for line in text.split("\n")]


@lru_cache(maxsize=8)
def _read_prompt_file(path: str) -> list[Prompt]:
    text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        entries = json.loads(text)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: a JSON prompt file must hold a list")
        prompts = [_entry(value, f"{path}[{i}]") for i, value in enumerate(entries)]
    elif suffix == ".jsonl":
        prompts = [_entry(json.loads(line), f"{path}:{number}")
                   for number, line in enumerate(_lines(text), 1) if line.strip()]
    else:
        prompts = [Prompt(line.strip()) for line in _lines(text)
                   if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return list(prompts)

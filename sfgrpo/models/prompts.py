"""Prompt files for real backbones: one prompt per line (blank lines and `#` comments skipped), or
a JSON list of strings (`.json`), so prompts may contain commas."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=8)
def read_prompt_file(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: a JSON prompt file must hold a list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return list(prompts)

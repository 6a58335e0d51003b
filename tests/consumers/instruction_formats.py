"""Alpaca and ShareGPT rows as LLaMA-Factory's dataset converters read them (its
`data/converter.py`, with `dataset_info.json`'s defaults: alpaca columns instruction, input,
output; sharegpt column conversations with tags from/value, human/gpt and an optional leading
system turn). axolotl's `alpaca` and `chat_template` (from/value mapped to role/content) types
read the same rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def alpaca_problems(path: Path) -> list[str]:
    problems = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        for key in ("instruction", "input", "output"):
            if not isinstance(row.get(key), str):
                problems.append(f"line {n}: {key} is not text")
        if not row.get("output"):
            problems.append(f"line {n}: empty output (no response to learn)")
        if not (row.get("instruction") or row.get("input")):
            problems.append(f"line {n}: no prompt")
    return problems


def sharegpt_problems(path: Path) -> list[str]:
    """LLaMA-Factory's alignment: a leading system turn is lifted out, then the turns must be
    human, gpt, human, gpt, ... and end with gpt (an even count); otherwise it drops the row."""
    problems = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        turns: list[dict[str, Any]] = json.loads(line).get("conversations") or []
        if turns and turns[0].get("from") == "system":
            turns = turns[1:]
        if not turns or len(turns) % 2:
            problems.append(f"line {n}: {len(turns)} turns after the system turn")
        for i, turn in enumerate(turns):
            expected = "human" if i % 2 == 0 else "gpt"
            if turn.get("from") != expected:
                problems.append(f"line {n}: turn {i} is from {turn.get('from')!r}, not {expected}")
            if not isinstance(turn.get("value"), str) or not turn["value"]:
                problems.append(f"line {n}: turn {i} has no text")
    return problems

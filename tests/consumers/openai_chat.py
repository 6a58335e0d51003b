"""The format checks of OpenAI's chat fine-tuning data preparation guidance (the cookbook's
"Data preparation and analysis for chat model fine-tuning"), as code.

Per example: a dict with a non-empty `messages` list; each message has `role` and `content`
and no keys but role, content, name, function_call and weight; roles are system, user,
assistant or function; content is a non-empty string; at least one assistant message. Per
file: at least 10 examples (the fine-tuning API's minimum). Tokens: the guidance counts
3 per message, 1 per name, the encoded role and content, and 3 for the reply, and warns that
longer examples than 16,385 tokens are truncated. Without OpenAI's tokenizer files (tiktoken
downloads them), the count here is an upper bound: a byte-level BPE token covers at least one
UTF-8 byte, so bytes bound tokens; an example within the limit by bytes is within it by tokens.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

ALLOWED_KEYS = frozenset({"role", "content", "name", "function_call", "weight"})
ROLES = frozenset({"system", "user", "assistant", "function"})
MAX_TOKENS_PER_EXAMPLE = 16_385
MIN_EXAMPLES = 10


def token_upper_bound(messages: list[dict[str, Any]]) -> int:
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(str(value).encode("utf-8"))
            if key == "name":
                total += 1
    return total


def format_errors(path: Path) -> tuple[Counter[str], int, int]:
    """(errors by the guidance's names, examples, the largest token bound of an example)."""
    errors: Counter[str] = Counter()
    examples = 0
    largest = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        examples += 1
        example = json.loads(line)
        if not isinstance(example, dict):
            errors["data_type"] += 1
            continue
        messages = example.get("messages")
        if not messages or not isinstance(messages, list):
            errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                errors["message_missing_key"] += 1
                continue
            if set(message) - ALLOWED_KEYS:
                errors["message_unrecognized_key"] += 1
            if message.get("role") not in ROLES:
                errors["unrecognized_role"] += 1
            content = message.get("content")
            function_call = message.get("function_call")
            if (not content and not function_call) or not isinstance(content, str):
                errors["missing_content"] += 1
        if not any(m.get("role") == "assistant" for m in messages if isinstance(m, dict)):
            errors["example_missing_assistant_message"] += 1
        tokens = token_upper_bound([m for m in messages if isinstance(m, dict)])
        largest = max(largest, tokens)
        if tokens > MAX_TOKENS_PER_EXAMPLE:
            errors["example_too_long"] += 1
    if examples < MIN_EXAMPLES:
        errors["too_few_examples"] += 1
    return errors, examples, largest

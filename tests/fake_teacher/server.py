"""Deterministic OpenAI-compatible chat-completions server with injectable faults (aiohttp.web)."""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import math
import random
import re
import signal
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from aiohttp import web

LISTENING_PREFIX: Final = "FAKE_TEACHER_LISTENING"
DEFAULT_MODEL: Final = "fake-teacher"

# The project's reference tokenizer: deterministic and cheap, used for both prompt and completion.
TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")
# Words worth putting into a generated sentence: letters, optionally joined by ' or -.
WORD_RE: Final = re.compile(r"[^\W\d_]+(?:['-][^\W\d_]+)*")
DATA_BLOCK_RE: Final = re.compile(
    r"<data>(.*?)</data>|^[ \t]*```data[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE
)
FENCED_JSON_RE: Final = re.compile(r"```(?:json|JSON)[^\n]*\n(.*?)```", re.DOTALL)
SCHEMA_PHRASE_RE: Final = re.compile(r"JSON schema", re.IGNORECASE)
JSON_WORD_RE: Final = re.compile(r"\bJSON\b")
_NUMBER_WORDS: Final = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "fifteen": 15,
    "twenty": 20,
}
COUNT_HINT_RE: Final = re.compile(
    r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\s+(?:new|more|additional|different|distinct|"
    r"fresh|unique|examples?|items?|samples?|questions?|sentences?|records?|rows?)\b",
    re.IGNORECASE,
)
SCHEMA_TYPES: Final = frozenset(
    {"object", "array", "string", "integer", "number", "boolean", "null"}
)
# Mixed into tiny prompts so that sentences built from a handful of words still differ.
_FILLER_TEXT: Final = (
    "about after again answer around because before between bring carry change city clear "
    "close country during early every family field follow friend great group happen house "
    "important interest island keep large later learn light little local market measure "
    "money morning music national never number often order paper people place plant point "
    "question quickly reason river school second several should simple small sound spring "
    "start state still story student system table thought together travel under until "
    "water weather while window winter without world writer year young"
)
FILLER_WORDS: Final = tuple(_FILLER_TEXT.split())
MAX_DEPTH: Final = 12
MAX_CHOICES: Final = 128
MAX_TIMELINE_EVENTS: Final = 1_000_000  # two per request; bounded for a long-running server


# --------------------------------------------------------------------------- configuration


@dataclass(slots=True)
class Config:
    """Runtime-tunable server behaviour; field names are the /admin/config keys."""

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    seed: int = 0
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    max_concurrency: int = 0
    retry_after_s: float = 1.0
    # A hosted API's request budget: at most this many requests admitted per
    # `rate_limit_window_s` (0 = none); one over it gets OpenAI's "requests per min (RPM)" 429,
    # with its x-ratelimit headers and the seconds until the oldest admission leaves the window.
    rate_limit_requests: int = 0
    rate_limit_window_s: float = 60.0
    error_rate: float = 0.0
    malformed_rate: float = 0.0
    truncate_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 3600.0
    # A teacher that lies: this share of the enum values it writes (a classification example's
    # label) are another option than the one the prompt asks for.
    mislabel_rate: float = 0.0
    faults_first_attempt_only: bool = False
    api_key: str | None = None
    no_json_schema: bool = False
    # Body fields answered with a 400 as OpenAI words it (a backend that does not take `seed`,
    # a reasoning model that wants max_completion_tokens or only the default temperature).
    refuse_params: list[str] = field(default_factory=list)
    # A context window (prompt + max_tokens, in the fake's tokens); 0 = unlimited. A request
    # over it gets vLLM's 400, whatever else is configured.
    context_tokens: int = 0
    down: bool = False

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply validated changes; raises ValueError naming the offending key."""
        staged = asdict(self)
        for key, value in changes.items():
            if key not in staged:
                raise ValueError(f"unknown config key {key!r}")
            staged[key] = _coerce(key, value)
        for key, value in staged.items():
            setattr(self, key, value)


_RATE_KEYS: Final = frozenset(
    {"error_rate", "malformed_rate", "truncate_rate", "hang_rate", "mislabel_rate"}
)
_NONNEG_FLOAT_KEYS: Final = frozenset(
    {"latency_ms", "jitter_ms", "retry_after_s", "hang_s", "rate_limit_window_s"}
)
_BOOL_KEYS: Final = frozenset({"faults_first_attempt_only", "no_json_schema", "down"})


def _coerce(key: str, value: Any) -> Any:
    if key in _RATE_KEYS or key in _NONNEG_FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise ValueError(f"{key} must be a number")
        if value < 0 or (key in _RATE_KEYS and value > 1):
            raise ValueError(f"{key} out of range: {value}")
        return float(value)
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be a boolean")
        return value
    if key in ("max_concurrency", "seed", "context_tokens", "rate_limit_requests"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer")
        if key in ("max_concurrency", "context_tokens", "rate_limit_requests") and value < 0:
            raise ValueError(f"{key} must be >= 0")
        return value
    if key == "api_key":
        if value is not None and not isinstance(value, str):
            raise ValueError("api_key must be a string or null")
        return value or None
    if key == "refuse_params":
        if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
            raise ValueError("refuse_params must be a list of parameter names")
        return list(value)
    if key == "models":
        names = [value] if isinstance(value, str) else value
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise ValueError("models must be a non-empty list of names")
        return list(names)
    raise ValueError(f"unknown config key {key!r}")  # pragma: no cover - guarded by update()


# --------------------------------------------------------------------------- text helpers


def count_tokens(text: str) -> int:
    """Token count under the fake teacher's tokenizer (regex \\w+|[^\\w\\s])."""
    return len(TOKEN_RE.findall(text))


def truncate_tokens(text: str, limit: int) -> str:
    """Cut text right after its `limit`-th token, so the result has exactly `limit` tokens."""
    if limit <= 0:
        return ""
    end = 0
    for i, match in enumerate(TOKEN_RE.finditer(text), start=1):
        end = match.end()
        if i == limit:
            return text[:end]
    return text


def message_text(message: Mapping[str, Any]) -> str:
    """Text of a chat message whose content is a string or a list of typed parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        ]
        return "\n".join(parts)
    return ""


def _data_blocks(text: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None) for m in DATA_BLOCK_RE.finditer(text)]


def _dedupe(words: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(words))


def _looks_like_schema(obj: Any) -> bool:
    if not isinstance(obj, dict):
        return False
    kind = obj.get("type")
    if isinstance(kind, str) and kind in SCHEMA_TYPES:
        return True
    if isinstance(kind, list) and kind and all(k in SCHEMA_TYPES for k in kind):
        return True
    return isinstance(obj.get("properties"), dict) or any(
        k in obj for k in ("$defs", "$ref", "anyOf", "oneOf", "$schema")
    )


def schema_from_prompt(texts: Sequence[str]) -> dict[str, Any] | None:
    """A JSON schema written in the prompt, in a ```json fence or after the words "JSON schema"."""
    for text in texts:
        for block in FENCED_JSON_RE.findall(text):
            try:
                candidate = json.loads(block)
            except ValueError:
                continue
            if _looks_like_schema(candidate):
                return dict(candidate)
    decoder = json.JSONDecoder()
    for text in texts:
        for phrase in SCHEMA_PHRASE_RE.finditer(text):
            brace = text.find("{", phrase.end())
            if brace < 0:
                continue
            try:
                candidate, _ = decoder.raw_decode(text, brace)
            except ValueError:
                continue
            if _looks_like_schema(candidate):
                return dict(candidate)
    return None


def _occurrences(option: Any, text: str) -> int:
    """Case-sensitive whole-word count of an enum value in text."""
    if isinstance(option, bool) or option is None or isinstance(option, dict | list):
        return 0
    needle = str(option)
    if not needle:
        return 0
    return len(re.findall(r"(?<!\w)" + re.escape(needle) + r"(?!\w)", text))


# --------------------------------------------------------------------------- prompt context


@dataclass(slots=True)
class PromptContext:
    """What the generator needs from the prompt, computed once per request."""

    vocab: list[str]
    enum_text_primary: str  # last user message outside data blocks: where instructions live
    enum_text_all: str  # whole last user message
    count_hint: int | None
    system_text: str
    last_user_text: str
    source_lines: list[str]
    _label_vocab: dict[tuple[str, ...], list[str] | None] = field(default_factory=dict)
    _enum_winners: dict[tuple[tuple[str, str], ...], list[int]] = field(default_factory=dict)

    @classmethod
    def from_messages(cls, messages: Sequence[Mapping[str, Any]]) -> PromptContext:
        user_texts = [message_text(m) for m in messages if m.get("role") == "user"]
        system_text = "\n".join(
            message_text(m) for m in messages if m.get("role") in ("system", "developer")
        )
        last_user = (
            user_texts[-1] if user_texts else (message_text(messages[-1]) if messages else "")
        )
        blocks = [b for text in user_texts for b in _data_blocks(text)]
        source = "\n".join(blocks) if blocks else last_user
        vocab = _dedupe(WORD_RE.findall(source))
        if len(vocab) < 12:
            # Too few distinct words would make every sentence a near-duplicate of the others.
            vocab = vocab + [w for w in FILLER_WORDS if w not in vocab]
        outside = DATA_BLOCK_RE.sub(" ", last_user)
        hint_match = COUNT_HINT_RE.search(outside) or COUNT_HINT_RE.search(last_user)
        count_hint: int | None = None
        if hint_match is not None:
            token = hint_match.group(1).lower()
            count_hint = int(token) if token.isdigit() else _NUMBER_WORDS[token]
        lines = [line for line in source.splitlines() if line.strip()]
        return cls(vocab, outside, last_user, count_hint, system_text, last_user, lines)

    def enum_winners(self, options: Sequence[Any]) -> list[int]:
        """Indexes of the enum options the instructions mention most (all of them if none is)."""
        key = tuple((type(o).__name__, str(o)) for o in options)
        winners = self._enum_winners.get(key)
        if winners is None:
            winners = list(range(len(options)))
            for text in (self.enum_text_primary, self.enum_text_all):
                counts = [_occurrences(o, text) for o in options]
                best = max(counts)
                if best > 0:
                    winners = [i for i, c in enumerate(counts) if c == best]
                    break
            self._enum_winners[key] = winners
        return winners

    def vocab_for_labels(self, labels: Sequence[str]) -> list[str] | None:
        """Words of the source lines mentioning a label, so a record's text resembles its class."""
        key = tuple(labels)
        if key not in self._label_vocab:
            patterns = [re.compile(r"(?<!\w)" + re.escape(label) + r"(?!\w)") for label in labels]
            words = [
                w
                for line in self.source_lines
                if any(p.search(line) for p in patterns)
                for w in WORD_RE.findall(line)
                if w not in labels
            ]
            vocab = _dedupe(words)
            self._label_vocab[key] = vocab if len(vocab) >= 4 else None
        return self._label_vocab[key]

    def wants_json(self) -> bool:
        return bool(
            JSON_WORD_RE.search(self.system_text) or JSON_WORD_RE.search(self.last_user_text)
        )


# --------------------------------------------------------------------------- content generation


class Generator:
    """Builds plausible, schema-valid values from a seeded RNG and the prompt's own words."""

    def __init__(
        self, rng: random.Random, ctx: PromptContext, root: Any = None, mislabel: float = 0.0
    ) -> None:
        self.rng = rng
        self.ctx = ctx
        self.root = root
        self.mislabel = mislabel
        self.vocab_override: list[str] | None = None
        # Enum values already emitted (labels) are kept out of free text so texts do not leak them.
        self.banned: set[str] = set()
        # Set while retrying a uniqueItems member: the prompt's favourite enum value is taken.
        self.diversify = False

    # -- text

    def sentence(self, min_len: int = 0, max_len: int | None = None) -> str:
        rng, vocab, focus = self.rng, self.ctx.vocab, self.vocab_override
        if self.banned:
            vocab = [w for w in vocab if w not in self.banned] or list(FILLER_WORDS)
            if focus:
                focus = [w for w in focus if w not in self.banned]
        # Distinct words where the vocabulary allows: repeated words read as obvious filler.
        n = rng.randint(6, max(6, min(20, len(vocab))))
        if focus:
            # Mostly words from lines of the record's own label, plus some from the whole prompt.
            k = min(len(focus), max(3, n * 3 // 5))
            words = _dedupe(rng.sample(focus, k) + rng.sample(vocab, min(len(vocab), n - k)))
            rng.shuffle(words)
        else:
            words = rng.sample(vocab, min(n, len(vocab)))
        while len(words) < 6:
            words.append(rng.choice(vocab))

        def render(ws: Sequence[str]) -> str:
            text = " ".join(ws)
            return text[:1].upper() + text[1:] + "." if text else ""

        text = render(words)
        if max_len is not None:
            while len(text) > max_len and len(words) > 1:
                words.pop()
                text = render(words)
        while len(text) < min_len:
            words.append(rng.choice(vocab))
            text = render(words)
        if max_len is not None and len(text) > max_len:
            text = text[:max_len]
        return text

    def paragraph(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(1, 3)))

    def choose_enum(self, options: Sequence[Any]) -> Any:
        if not options:
            return None
        self.banned.update(o for o in options if isinstance(o, str))
        if self.diversify:
            return self.rng.choice(list(options))
        winners = self.ctx.enum_winners(options)
        # Rolled only when lying: a truthful fake's answers stay what they always were.
        if self.mislabel > 0 and self.rng.random() < self.mislabel:
            others = [i for i in range(len(options)) if i not in winners]
            if others:
                return options[self.rng.choice(others)]
        return options[self.rng.choice(winners)]

    # -- schema walk

    def resolve(self, schema: Any) -> Any:
        """Follow local $ref pointers (#/$defs/X, #/definitions/X, any #/a/b), merging siblings."""
        for _ in range(MAX_DEPTH):
            if not isinstance(schema, dict) or "$ref" not in schema:
                return schema
            target: Any = self.root
            ref = schema["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#"):
                return {k: v for k, v in schema.items() if k != "$ref"}
            for part in filter(None, ref[1:].split("/")):
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, dict) else None
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **siblings} if isinstance(target, dict) else siblings
        return schema

    def value(self, schema: Any, depth: int = 0, in_array: bool = False) -> Any:
        schema = self.resolve(schema)
        if schema is True or schema is None or schema == {}:
            return self.sentence()
        if not isinstance(schema, dict):
            return None
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list):
            return self.choose_enum(schema["enum"])
        if isinstance(schema.get("allOf"), list):
            merged = _merge_all_of([self.resolve(s) for s in schema["allOf"]])
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.value(_merge_all_of([rest, merged]), depth, in_array)
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                resolved = [self.resolve(b) for b in branches]
                usable = [
                    b for b in resolved if not (isinstance(b, dict) and b.get("type") == "null")
                ]
                branch = self.rng.choice(usable or resolved)
                rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
                merged = {**rest, **branch} if isinstance(branch, dict) else branch
                return self.value(merged, depth, in_array)
        kind = self._kind(schema)
        if kind == "object":
            return self._object(schema, depth, in_array)
        if kind == "array":
            return self._array(schema, depth, in_array)
        if kind == "integer":
            return self._integer(schema)
        if kind == "number":
            return self._number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        if kind == "null":
            return None
        return self._string(schema)

    def _kind(self, schema: Mapping[str, Any]) -> str:
        kind = schema.get("type")
        if isinstance(kind, list):
            options = [k for k in kind if k != "null"] or ["null"]
            kind = options[0] if len(options) == 1 else self.rng.choice(options)
        if isinstance(kind, str):
            return kind
        if any(k in schema for k in ("properties", "required", "additionalProperties")):
            return "object"
        if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
            return "array"
        if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
            return "number"
        return "string"

    def _object(self, schema: Mapping[str, Any], depth: int, in_array: bool) -> dict[str, Any]:
        props = schema.get("properties") or {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        # Past the depth limit only required members are emitted, which ends recursive schemas.
        names = [name for name in props if depth < MAX_DEPTH or name in required]
        # Enum members (labels) are decided first so the record's free text can follow its label.
        labelled = [name for name in names if self._is_enum(props[name])]
        values = {name: self.value(props[name], depth + 1, in_array) for name in labelled}
        labels = [v for v in values.values() if isinstance(v, str) and v]
        focus = self.ctx.vocab_for_labels(labels) if labels else None
        saved = self.vocab_override
        if focus is not None:
            self.vocab_override = focus
        try:
            for name in names:
                if name not in values:
                    values[name] = self.value(props[name], depth + 1, in_array)
        finally:
            self.vocab_override = saved
        out = {name: values[name] for name in names}
        extra = schema.get("additionalProperties")
        for name in required:
            if name not in out:
                out[name] = self.value(
                    extra if isinstance(extra, dict) else {}, depth + 1, in_array
                )
        min_props = schema.get("minProperties")
        if isinstance(min_props, int) and extra is not False:
            i = 0
            while len(out) < min_props:
                i += 1
                if f"field_{i}" not in out:
                    out[f"field_{i}"] = self.value(
                        extra if isinstance(extra, dict) else {}, depth + 1, in_array
                    )
        return out

    def _is_enum(self, schema: Any) -> bool:
        resolved = self.resolve(schema)
        return isinstance(resolved, dict) and isinstance(resolved.get("enum"), list)

    def _array(self, schema: Mapping[str, Any], depth: int, in_array: bool) -> list[Any]:
        min_items = _int_keyword(schema, "minItems") or 0
        max_items = _int_keyword(schema, "maxItems")
        raw_prefix = schema.get("prefixItems")
        prefix: list[Any] = raw_prefix if isinstance(raw_prefix, list) else []
        items = schema.get("items", {})
        item_schema = self.resolve(items)
        of_objects = isinstance(item_schema, dict) and self._kind_static(item_schema) == "object"
        wanted = max(min_items, 1)
        # The prompt's "N examples" sizes the outermost list of records, not nested lists.
        if self.ctx.count_hint is not None and not in_array and (of_objects or depth == 0):
            wanted = max(min_items, self.ctx.count_hint)
        if depth >= MAX_DEPTH:
            wanted = min_items
        if max_items is not None:
            wanted = min(max_items, wanted)
        if items is False:
            wanted = min(wanted, len(prefix))
        unique = schema.get("uniqueItems") is True
        out: list[Any] = []
        seen: set[str] = set()
        for i in range(wanted):
            sub = prefix[i] if i < len(prefix) else items
            candidate = self.value(sub, depth + 1, True)
            if unique:
                saved, self.diversify = self.diversify, True
                try:
                    for _ in range(20):
                        key = json.dumps(candidate, sort_keys=True)
                        if key not in seen:
                            break
                        candidate = self.value(sub, depth + 1, True)
                finally:
                    self.diversify = saved
                key = json.dumps(candidate, sort_keys=True)
                # The item schema cannot produce more distinct values; stop rather than repeat.
                if key in seen and len(out) >= min_items:
                    break
                seen.add(key)
            out.append(candidate)
        return out

    @staticmethod
    def _kind_static(schema: Mapping[str, Any]) -> str | None:
        kind = schema.get("type")
        if isinstance(kind, str):
            return kind
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            return non_null[0] if non_null else None
        if "properties" in schema:
            return "object"
        return None

    def _bounds(self, schema: Mapping[str, Any]) -> tuple[float | None, float | None, bool, bool]:
        lo, hi = _num_keyword(schema, "minimum"), _num_keyword(schema, "maximum")
        ex_lo, ex_hi = (
            _num_keyword(schema, "exclusiveMinimum"),
            _num_keyword(schema, "exclusiveMaximum"),
        )
        # Draft 4 uses booleans next to minimum/maximum; later drafts use numbers.
        lo_ex = schema.get("exclusiveMinimum") is True
        hi_ex = schema.get("exclusiveMaximum") is True
        if ex_lo is not None and (lo is None or ex_lo >= lo):
            lo, lo_ex = ex_lo, True
        if ex_hi is not None and (hi is None or ex_hi <= hi):
            hi, hi_ex = ex_hi, True
        return lo, hi, lo_ex, hi_ex

    def _integer(self, schema: Mapping[str, Any]) -> int:
        lo, hi, lo_ex, hi_ex = self._bounds(schema)
        lo_i = None if lo is None else (math.floor(lo) + 1 if lo_ex else math.ceil(lo))
        hi_i = None if hi is None else (math.ceil(hi) - 1 if hi_ex else math.floor(hi))
        if lo_i is None and hi_i is None:
            lo_i, hi_i = 0, 100
        elif lo_i is None:
            assert hi_i is not None
            lo_i = hi_i - 100
        elif hi_i is None:
            hi_i = lo_i + 100
        hi_i = max(lo_i, hi_i)
        step = schema.get("multipleOf")
        if isinstance(step, int) and not isinstance(step, bool) and step > 0:
            first, last = -(-lo_i // step), hi_i // step
            if first <= last:
                return self.rng.randint(first, last) * step
        return self.rng.randint(lo_i, hi_i)

    def _number(self, schema: Mapping[str, Any]) -> float | int:
        if isinstance(schema.get("multipleOf"), int):
            return self._integer(schema)
        lo, hi, lo_ex, hi_ex = self._bounds(schema)
        if lo is None and hi is None:
            lo, hi = 0.0, 100.0
        elif lo is None:
            assert hi is not None
            lo = hi - 100.0
        elif hi is None:
            hi = lo + 100.0
        hi = max(lo, hi)
        value = round(self.rng.uniform(lo, hi), 2)
        if value < lo or (lo_ex and value <= lo) or value > hi or (hi_ex and value >= hi):
            value = (lo + hi) / 2
        return value

    def _string(self, schema: Mapping[str, Any]) -> str:
        min_len = _int_keyword(schema, "minLength") or 0
        max_len = _int_keyword(schema, "maxLength")
        fmt = schema.get("format")
        rng = self.rng
        formatted: str | None = None
        if fmt == "date-time":
            formatted = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"
        elif fmt == "date":
            formatted = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        elif fmt == "email":
            formatted = f"{rng.choice(self.ctx.vocab).lower()}@example.com"
        elif fmt in ("uri", "url"):
            formatted = f"https://example.com/{rng.choice(self.ctx.vocab).lower()}"
        elif fmt == "uuid":
            formatted = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if formatted is not None and min_len <= len(formatted) <= (max_len or len(formatted)):
            return formatted
        return self.sentence(min_len, max_len)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int_keyword(schema: Mapping[str, Any], key: str) -> int | None:
    value = schema.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num_keyword(schema: Mapping[str, Any], key: str) -> float | None:
    value = schema.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _merge_all_of(schemas: Sequence[Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for sub in schemas:
        if not isinstance(sub, dict):
            continue
        for key, value in sub.items():
            if key == "properties" and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            elif key == "required" and isinstance(merged.get(key), list):
                merged[key] = list(dict.fromkeys([*merged[key], *value]))
            else:
                merged[key] = value
    return merged


def generate_from_schema(schema: Any, rng: random.Random, ctx: PromptContext) -> Any:
    """A value valid under `schema` (within the supported subset), seeded and prompt-flavoured."""
    return Generator(rng, ctx, schema).value(schema)


# --------------------------------------------------------------------------- requests


class RequestError(Exception):
    """A request the server refuses, carried to the handler as (status, OpenAI error body)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | int | None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, code, param)


def error_body(
    message: str, type_: str, code: str | int | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def refusal_message(name: str, value: Any) -> tuple[str, str]:
    """(message, code) in OpenAI's words for a body field this server does not take."""
    if name == "max_tokens":
        return (
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "unsupported_parameter",
        )
    if name in ("temperature", "top_p"):
        return (
            f"Unsupported value: '{name}' does not support {value} with this model. "
            "Only the default (1) value is supported.",
            "unsupported_value",
        )
    return f"Unrecognized request argument supplied: {name}", "unsupported_parameter"


@dataclass(slots=True)
class OutputMode:
    """How a completion's content is shaped: free text, JSON for a schema, or a free JSON object."""

    kind: str  # "text" | "json"
    schema: Any = None
    json_requested: bool = False  # the caller used response_format, so malformed output is a fault


def parse_output_mode(
    body: Mapping[str, Any], ctx: PromptContext, no_json_schema: bool
) -> OutputMode:
    fmt = body.get("response_format")
    if fmt is None:
        if ctx.wants_json():
            schema = schema_from_prompt([ctx.system_text, ctx.last_user_text])
            if schema is not None:
                return OutputMode("json", schema, json_requested=True)
        return OutputMode("text")
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise RequestError(
            400,
            "response_format must be an object with a type",
            "invalid_request_error",
            "invalid_value",
        )
    kind = fmt["type"]
    if kind == "text":
        return OutputMode("text")
    if kind == "json_schema":
        if no_json_schema:
            # llama.cpp-style servers reject OpenAI's json_schema format outright.
            raise RequestError(
                500,
                "response_format type 'json_schema' is not supported by this server",
                "server_error",
                500,
            )
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict | bool):
            raise RequestError(
                400,
                "response_format.json_schema must carry a schema object",
                "invalid_request_error",
                "invalid_value",
            )
        return OutputMode("json", spec.get("schema", {}), json_requested=True)
    if kind == "json_object":
        schema = fmt.get("schema")
        if isinstance(schema, dict):
            return OutputMode("json", schema, json_requested=True)
        prompt_schema = schema_from_prompt([ctx.system_text, ctx.last_user_text])
        if prompt_schema is not None:
            return OutputMode("json", prompt_schema, json_requested=True)
        return OutputMode(
            "json",
            {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
            json_requested=True,
        )
    raise RequestError(
        400, f"unsupported response_format type {kind!r}", "invalid_request_error", "invalid_value"
    )


def _positive_int(body: Mapping[str, Any], key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(
            400, f"{key} must be a positive integer", "invalid_request_error", "invalid_value"
        )
    return value


def malform(content: str, variant: float) -> str:
    """Break a JSON document so that json.loads rejects it (cut mid-way or unbalanced braces)."""
    if variant < 0.5:
        broken = content[: max(1, len(content) // 2)]
    elif variant < 0.75:
        broken = content + "}"
    else:
        broken = "{" + content.rstrip("}]")
    try:
        json.loads(broken)
    except ValueError:
        return broken
    return "{" + content  # a leading unmatched brace never parses


# --------------------------------------------------------------------------- server state


_TOKEN_RE: Final = re.compile(r"\w+|\s+|[^\w\s]")


def fake_logprobs(content: str, rng: random.Random) -> dict[str, Any]:
    """OpenAI's `logprobs` object for `content`: tokens that spell it exactly, word tokens
    uncertain (logprob in [-2, 0)), punctuation and spaces near-certain; deterministic."""
    items = []
    for token in _TOKEN_RE.findall(content):
        word = token[0].isalnum() or token[0] == "_"
        logprob = -rng.uniform(0.0, 2.0) if word else -rng.uniform(0.0, 0.01)
        items.append(
            {
                "token": token,
                "logprob": round(logprob, 6),
                "bytes": list(token.encode()),
                "top_logprobs": [],
            }
        )
    return {"content": items, "refusal": None}


def _uniforms(digest: bytes) -> list[float]:
    return [int.from_bytes(digest[i : i + 8], "big") / 2**64 for i in range(0, len(digest), 8)]


class TeacherState:
    """Counters, fingerprint memory and the request handlers that update them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.in_flight = 0
        self.in_flight_by_model: dict[str, int] = {}
        self.reset()

    def reset(self) -> None:
        self.requests_total = 0
        self.completions_ok = 0
        self.by_status: dict[int, int] = {}
        # in_flight is a live gauge of running handlers, so a reset only rebases its maximum.
        self.max_in_flight = self.in_flight
        self.seen: dict[bytes, int] = {}
        self.successes: dict[bytes, int] = {}
        self.duplicate_successes = 0
        self.client_disconnects = 0
        self.faults = {"error": 0, "malformed": 0, "truncate": 0, "hang": 0}
        # (wall-clock time, requests in flight just after) at each admission and each answer,
        # so a benchmark can see how full the teacher was over a run and where it idled.
        self.timeline: list[tuple[float, int]] = []
        # Monotonic times of the requests admitted in the current rate-limit window.
        self.admitted: collections.deque[float] = collections.deque()

    def stats(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "completions_ok": self.completions_ok,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "unique_fingerprints": len(self.seen),
            "duplicate_successes": self.duplicate_successes,
            "client_disconnects": self.client_disconnects,
            "faults_injected": dict(self.faults),
        }

    def _reply(
        self, status: int, payload: Any, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if status == 200 and self.config.rate_limit_requests:
            headers = {**(headers or {}), **self._budget_headers()}
        return web.Response(
            status=status,
            body=json.dumps(payload).encode(),
            content_type="application/json",
            headers=headers,
        )

    def _budget_headers(self) -> dict[str, str]:
        """What OpenAI tells on every answer about the request budget: its limit, what is left
        of it and when it is whole again."""
        cfg = self.config
        now = time.monotonic()
        while self.admitted and now - self.admitted[0] >= cfg.rate_limit_window_s:
            self.admitted.popleft()
        reset = cfg.rate_limit_window_s - (now - self.admitted[0]) if self.admitted else 0.0
        return {
            "x-ratelimit-limit-requests": str(cfg.rate_limit_requests),
            "x-ratelimit-remaining-requests": str(
                max(0, cfg.rate_limit_requests - len(self.admitted))
            ),
            "x-ratelimit-reset-requests": f"{reset:.3f}s",
        }

    def _check_auth(self, request: web.Request) -> None:
        key = self.config.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            raise RequestError(
                401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            )

    # -- handlers

    async def chat_completions(self, request: web.Request) -> web.Response:
        cfg = self.config
        arrival = asyncio.get_running_loop().time()
        self.requests_total += 1
        if cfg.down:
            return self._reply(
                503,
                error_body(
                    "The teacher is unavailable.", "service_unavailable", "service_unavailable"
                ),
            )
        try:
            self._check_auth(request)
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise RequestError(
                    400, "request body is not valid JSON", "invalid_request_error", "invalid_json"
                ) from None
            if not isinstance(body, dict):
                raise RequestError(
                    400,
                    "request body must be a JSON object",
                    "invalid_request_error",
                    "invalid_json",
                )
            model = body.get("model") or cfg.models[0]
            if model not in cfg.models:
                raise RequestError(
                    404,
                    f"The model `{model}` does not exist or you do not have access to it.",
                    "invalid_request_error",
                    "model_not_found",
                )
            messages = body.get("messages")
            if (
                not isinstance(messages, list)
                or not messages
                or not all(isinstance(m, dict) for m in messages)
            ):
                raise RequestError(
                    400,
                    "messages must be a non-empty list of message objects",
                    "invalid_request_error",
                    "invalid_value",
                )
            for name in cfg.refuse_params:
                if name in body:
                    message, code = refusal_message(name, body[name])
                    raise RequestError(400, message, "invalid_request_error", code, param=name)
            if body.get("stream"):
                raise RequestError(
                    400,
                    "streaming is not supported by the fake teacher",
                    "invalid_request_error",
                    "unsupported_parameter",
                )
            n = _positive_int(body, "n", 1) or 1
            if n > MAX_CHOICES:
                raise RequestError(
                    400,
                    f"n must be at most {MAX_CHOICES}",
                    "invalid_request_error",
                    "invalid_value",
                )
            max_tokens = _positive_int(body, "max_completion_tokens", None) or _positive_int(
                body, "max_tokens", None
            )
            if cfg.context_tokens:
                prompt = sum(count_tokens(message_text(m)) for m in messages)
                wanted = prompt + (max_tokens or 0)
                if wanted > cfg.context_tokens:
                    raise RequestError(
                        400,
                        f"This model's maximum context length is {cfg.context_tokens} tokens. "
                        f"However, you requested {wanted} tokens ({prompt} in the messages, "
                        f"{max_tokens or 0} in the completion). Please reduce the length of the "
                        "messages or completion.",
                        "BadRequestError",
                        400,
                    )
            ctx = PromptContext.from_messages(messages)
            mode = parse_output_mode(body, ctx, cfg.no_json_schema)
        except RequestError as exc:
            return self._reply(exc.status, exc.body)

        if cfg.rate_limit_requests:
            now = time.monotonic()
            while self.admitted and now - self.admitted[0] >= cfg.rate_limit_window_s:
                self.admitted.popleft()
            if len(self.admitted) >= cfg.rate_limit_requests:
                wait = cfg.rate_limit_window_s - (now - self.admitted[0])
                limit = cfg.rate_limit_requests
                return self._reply(
                    429,
                    error_body(
                        f"Rate limit reached for {model} in organization org-fake on requests "
                        f"per min (RPM): Limit {limit}, Used {limit}, Requested 1. Please try "
                        f"again in {wait:.3f}s.",
                        "requests",
                        "rate_limit_exceeded",
                    ),
                    {
                        "x-ratelimit-limit-requests": str(limit),
                        "x-ratelimit-remaining-requests": "0",
                        "x-ratelimit-reset-requests": f"{wait:.3f}s",
                    },
                )
            self.admitted.append(now)

        if cfg.max_concurrency and self.in_flight >= cfg.max_concurrency:
            retry = cfg.retry_after_s
            return self._reply(
                429,
                error_body(
                    f"Rate limit reached for {model}: more than {cfg.max_concurrency} concurrent requests.",
                    "requests",
                    "rate_limit_exceeded",
                ),
                {"Retry-After": f"{retry:g}", "retry-after-ms": str(round(retry * 1000))},
            )

        # Admitted: from here until the response the request counts as in flight.
        self.in_flight += 1
        self.in_flight_by_model[model] = self.in_flight_by_model.get(model, 0) + 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._mark()
        try:
            return await self._complete(body, model, messages, n, max_tokens, ctx, mode, arrival)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away (e.g. it timed out on a hang).
            self.client_disconnects += 1
            raise
        finally:
            self.in_flight -= 1
            self.in_flight_by_model[model] -= 1
            self._mark()

    def _mark(self) -> None:
        if len(self.timeline) < MAX_TIMELINE_EVENTS:
            self.timeline.append((time.time(), self.in_flight))

    async def _complete(
        self,
        body: Mapping[str, Any],
        model: str,
        messages: list[Any],
        n: int,
        max_tokens: int | None,
        ctx: PromptContext,
        mode: OutputMode,
        arrival: float,
    ) -> web.Response:
        cfg = self.config
        loop = asyncio.get_running_loop()
        fingerprint = hashlib.blake2b(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), digest_size=16
        ).digest()
        attempt = self.seen.get(fingerprint, 0) + 1
        self.seen[fingerprint] = attempt
        rolls = _uniforms(
            hashlib.blake2b(
                fingerprint
                + attempt.to_bytes(8, "big")
                + cfg.seed.to_bytes(16, "big", signed=True),
                digest_size=64,
            ).digest()
        )
        faults_on = not cfg.faults_first_attempt_only or attempt == 1
        hang = faults_on and rolls[0] < cfg.hang_rate
        error = faults_on and rolls[1] < cfg.error_rate
        malformed = faults_on and rolls[2] < cfg.malformed_rate and mode.json_requested
        truncated = faults_on and rolls[3] < cfg.truncate_rate

        if hang:
            self.faults["hang"] += 1
            await asyncio.sleep(cfg.hang_s)
            deadline = loop.time()
        else:
            delay_ms = max(0.0, cfg.latency_ms + (2.0 * rolls[4] - 1.0) * cfg.jitter_ms)
            deadline = arrival + delay_ms / 1000.0

        payload: dict[str, Any] | None = None
        if not error:
            payload = self._completion_payload(
                fingerprint,
                attempt,
                rolls,
                body,
                model,
                messages,
                n,
                max_tokens,
                ctx,
                mode,
                malformed,
                truncated,
            )
        # The answer is built before sleeping and the sleep only covers what is left of the
        # latency, so the server's own CPU time does not add to the latency a benchmark sees.
        remaining = deadline - loop.time()
        if remaining > 0:
            await asyncio.sleep(remaining)

        if payload is None:
            self.faults["error"] += 1
            return self._reply(
                500,
                error_body(
                    "The server had an error while processing your request.",
                    "server_error",
                    "internal_error",
                ),
            )
        if malformed:
            self.faults["malformed"] += 1
        if truncated:
            self.faults["truncate"] += 1
        self.completions_ok += 1
        successes = self.successes.get(fingerprint, 0) + 1
        self.successes[fingerprint] = successes
        if successes == 2:
            self.duplicate_successes += 1
        return self._reply(200, payload)

    def _completion_payload(
        self,
        fingerprint: bytes,
        attempt: int,
        rolls: Sequence[float],
        body: Mapping[str, Any],
        model: str,
        messages: list[Any],
        n: int,
        max_tokens: int | None,
        ctx: PromptContext,
        mode: OutputMode,
        malformed: bool,
        truncated: bool,
    ) -> dict[str, Any]:
        content_key = hashlib.blake2b(
            json.dumps(
                [model, messages, body.get("seed"), self.config.seed],
                sort_keys=True,
                separators=(",", ":"),
            ).encode(),
            digest_size=16,
        ).digest()
        prompt_tokens = sum(count_tokens(message_text(m)) for m in messages)
        choices: list[dict[str, Any]] = []
        completion_tokens = 0
        for index in range(n):
            generator = Generator(
                random.Random(content_key + index.to_bytes(4, "big")),
                ctx,
                mode.schema,
                mislabel=self.config.mislabel_rate,
            )
            if mode.kind == "json":
                content = json.dumps(generator.value(mode.schema), ensure_ascii=False)
            else:
                content = generator.paragraph()
            finish = "stop"
            if malformed:
                content = malform(content, rolls[6])
            if truncated:
                total = count_tokens(content)
                keep = min(total - 1, int(total * (0.2 + 0.6 * rolls[5])))
                content = truncate_tokens(content, keep)
                finish = "length"
            if max_tokens is not None and count_tokens(content) > max_tokens:
                content = truncate_tokens(content, max_tokens)
                finish = "length"
            completion_tokens += count_tokens(content)
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": (
                        fake_logprobs(content, random.Random(content_key + b"lp" + bytes([index])))
                        if body.get("logprobs")
                        else None
                    ),
                    "finish_reason": finish,
                }
            )
        return {
            "id": "chatcmpl-"
            + hashlib.blake2b(fingerprint + attempt.to_bytes(8, "big"), digest_size=12).hexdigest(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake_teacher",
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            self._check_auth(request)
        except RequestError as exc:
            return web.json_response(exc.body, status=exc.status)
        data = [
            {"id": name, "object": "model", "created": 1700000000, "owned_by": "fake-teacher"}
            for name in self.config.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def get_timeline(self, request: web.Request) -> web.Response:
        return web.json_response({"events": self.timeline})

    async def admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def admin_get_config(self, request: web.Request) -> web.Response:
        return web.json_response(asdict(self.config))

    async def admin_config(self, request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read() or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("config body must be a JSON object")
            self.config.update(changes)
        except ValueError as exc:
            return web.json_response(
                error_body(str(exc), "invalid_request_error", "invalid_value"), status=400
            )
        return web.json_response(asdict(self.config))

    async def metrics(self, request: web.Request) -> web.Response:
        lines: list[str] = []
        for metric, help_text in (
            ("vllm:num_requests_running", "Number of requests currently running on GPU."),
            ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
        ):
            lines.append(f"# HELP {metric} {help_text}")
            lines.append(f"# TYPE {metric} gauge")
            for name in self.config.models:
                running = self.in_flight_by_model.get(name, 0) if metric.endswith("running") else 0
                lines.append(f'{metric}{{model_name="{name}"}} {float(running)}')
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8"
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "down" if self.config.down else "ok"})


STATE_KEY: Final = web.AppKey("state", TeacherState)


def create_app(config: Config) -> web.Application:
    """The aiohttp application; its TeacherState is reachable as app[STATE_KEY]."""
    state = TeacherState(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    app.router.add_post("/v1/chat/completions", state.chat_completions)
    app.router.add_post("/chat/completions", state.chat_completions)
    app.router.add_get("/v1/models", state.list_models)
    app.router.add_get("/stats", state.get_stats)
    app.router.add_get("/timeline", state.get_timeline)
    app.router.add_post("/admin/reset", state.admin_reset)
    app.router.add_get("/admin/config", state.admin_get_config)
    app.router.add_post("/admin/config", state.admin_config)
    app.router.add_get("/metrics", state.metrics)
    app.router.add_get("/health", state.health)
    return app


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.fake_teacher", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 binds a free port")
    p.add_argument(
        "--model", action="append", dest="models", help=f"repeatable; default {DEFAULT_MODEL}"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--max-concurrency", type=int, default=0, help="0 = unlimited")
    p.add_argument("--retry-after-s", type=float, default=1.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--malformed-rate", type=float, default=0.0)
    p.add_argument("--truncate-rate", type=float, default=0.0)
    p.add_argument("--hang-rate", type=float, default=0.0)
    p.add_argument("--hang-s", type=float, default=3600.0)
    p.add_argument(
        "--mislabel-rate", type=float, default=0.0, help="share of labels not the one asked for"
    )
    p.add_argument("--faults-first-attempt-only", action="store_true")
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-json-schema", action="store_true")
    p.add_argument("--down", action="store_true", help="start answering 503 until reconfigured")
    return p


def config_from_args(ns: argparse.Namespace) -> Config:
    config = Config()
    changes = {k: v for k, v in vars(ns).items() if k not in ("host", "port")}
    if not changes["models"]:
        changes["models"] = [DEFAULT_MODEL]
    config.update(changes)
    return config


async def serve(config: Config, host: str, port: int) -> None:
    """Run until SIGTERM/SIGINT, announcing the bound address on stdout once listening."""
    runner = web.AppRunner(
        create_app(config),
        access_log=None,
        # Cancelling handlers of vanished clients keeps hung requests from inflating in_flight.
        handler_cancellation=True,
        # A test double owes nobody a graceful drain; hung handlers must not delay stop().
        shutdown_timeout=0.25,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=2048)
    await site.start()
    bound_port = runner.addresses[0][1]
    print(f"{LISTENING_PREFIX} http://{host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        import uvloop  # the event loop is most of the per-request cost, and uvloop halves it

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config, ns.host, ns.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

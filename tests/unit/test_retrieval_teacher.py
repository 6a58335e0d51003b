"""The efficacy benchmark's retrieval teacher reads every prompt the product sends: it answers
with the label the prompt asks for, in the shape its schema asks for, nearest to what it shows."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from numpy.typing import NDArray

from bench.retrieval_teacher import EmbeddingTable, Pool, Prompt, RetrievalTeacher
from service.domain.prompts.render import template_ids
from service.domain.strategies import get_strategy
from tests.unit.domain.test_prompts import LABELS, _contexts

VOCABULARY = ["parcel", "refund", "invoice", "late", "charge", "money", "box", "bill"]


def _bag_of_words(texts: list[str]) -> NDArray[np.float32]:
    """A deterministic stand-in for MiniLM: word counts over a small vocabulary plus a hash."""
    out = np.zeros((len(texts), len(VOCABULARY) + 4), dtype=np.float32)
    for i, text in enumerate(texts):
        words = text.lower().split()
        for j, word in enumerate(VOCABULARY):
            out[i, j] = words.count(word)
        digest = hashlib.sha256(text.encode()).digest()
        out[i, len(VOCABULARY) :] = [b / 255 for b in digest[:4]]
        out[i] /= np.linalg.norm(out[i]) or 1.0
    return out


@pytest.fixture
def teacher() -> RetrievalTeacher:
    embed = EmbeddingTable(_bag_of_words)
    rows = [
        ("my parcel is late", "shipping"),
        ("where is the box", "shipping"),
        ("the parcel never came", "shipping"),
        ("a second charge on my bill", "billing"),
        ("the invoice is wrong", "billing"),
        ("charge twice on the invoice", "billing"),
        ("give me my money back", "refund"),
        ("refund the box please", "refund"),
        ("I want a refund", "refund"),
    ]
    texts = [t for t, _ in rows]
    pool = Pool(texts, [label for _, label in rows], embed(texts))
    return RetrievalTeacher(pool, embed, known={"Where is my parcel #1": "shipping"})


def test_it_answers_every_prompt_kind_of_every_strategy(teacher: RetrievalTeacher) -> None:
    seen_templates = set()
    for name, ctx in _contexts("Where is my parcel"):
        for target in get_strategy(name).plan(ctx):
            request = target.request
            seen_templates.add(request.template_id)
            messages = [m.model_dump() for m in request.messages]
            answer = teacher.answer(messages)
            schema = request.response_schema or {}
            assert set(answer) == set(schema["properties"]), (name, request.template_id)
            if "examples" in answer:
                assert len(answer["examples"]) == target.n_examples
                for item in answer["examples"]:
                    assert item["label"] in LABELS
                    if target.expected_label is not None:
                        assert item["label"] == target.expected_label, target.target_id
                    if "rationale" in schema["properties"]["examples"]["items"]["properties"]:
                        assert item["rationale"]
            else:
                assert answer["answer"] in LABELS
    # Every generation template the strategies use was read (verify is the filters' own).
    assert seen_templates == set(template_ids()) - {"verify"}


def test_nearest_rows_follow_the_texts_shown_and_are_given_out_once(
    teacher: RetrievalTeacher,
) -> None:
    prompt = _llm2llm_messages("the parcel is late", "shipping")
    first = teacher.answer(prompt)["examples"]
    assert first[0]["text"] in ("my parcel is late", "the parcel never came")
    # One shipping row is left unused: it comes first, then the nearest given-out one again.
    again = teacher.answer(prompt)["examples"]
    assert again[0]["text"] == "where is the box"
    assert teacher.reused == 1


def test_a_contrast_prompt_is_answered_with_the_label_it_names_near_the_text_shown(
    teacher: RetrievalTeacher,
) -> None:
    from service.domain.strategies import LLM2LLM

    # A billing text the student took for refund: the contrast prompt asks for refund rows
    # like it, and the nearest refund row to "money back on the invoice" is the money one.
    _, ctx = next(c for c in _contexts("x") if c[0] == "llm2llm")
    wrong = ctx.evaluated[0].model_copy(
        update={
            "row_id": "v9",
            "split": "validation",
            "input": "give money back on the invoice",
            "gold": "billing",
            "predicted": "refund",
        }
    )
    ctx = ctx.model_copy(update={"evaluated": [wrong], "max_examples": 6})
    contrast = [t for t in LLM2LLM().plan(ctx) if t.reason == "contrast"]
    assert contrast and contrast[0].expected_label == "refund"
    answer = teacher.answer([m.model_dump() for m in contrast[0].request.messages])
    assert [e["label"] for e in answer["examples"]] == ["refund"] * contrast[0].n_examples
    assert answer["examples"][0]["text"] == "give me my money back"


def test_a_lying_teacher_gives_wrong_labels(teacher: RetrievalTeacher) -> None:
    teacher.mislabel = 1.0
    examples = teacher.answer(_llm2llm_messages("refund my money", "refund"))["examples"]
    assert all(e["label"] != "refund" for e in examples)


def test_a_teacher_that_lies_with_texts_labels_other_labels_rows_as_asked(
    teacher: RetrievalTeacher,
) -> None:
    teacher.mislabel, teacher.lie = 1.0, "text"
    examples = teacher.answer(_llm2llm_messages("refund my money", "refund"))["examples"]
    pool = teacher.pool
    assert examples and all(e["label"] == "refund" for e in examples)
    assert all(pool.labels[pool.texts.index(e["text"])] != "refund" for e in examples)


def test_the_prompt_reader_finds_schema_data_and_the_label_asked_for() -> None:
    prompt = Prompt.read(_llm2llm_messages("refund my money", "refund"))
    assert prompt.expected_label == "refund"
    assert prompt.labels == LABELS
    assert prompt.items[0]["text"] == "refund my money"
    assert prompt.examples_wanted() == (2, ["text", "label"], ["text", "label"])


def _llm2llm_messages(text: str, label: str) -> list[dict[str, str]]:
    from service.domain.prompts import build_request, examples_schema
    from service.domain.spec import TaskKind

    request = build_request(
        "llm2llm",
        params={
            "kind": "classification",
            "instructions": "Route the ticket.",
            "labels": LABELS,
            "n_examples": 2,
            "expected_label": label,
        },
        data={"example": [{"text": text, "label": label, "student_prediction": "billing"}]},
        response_schema=examples_schema(TaskKind.classification, LABELS, 2),
        schema_name="examples",
    )
    return [json.loads(m.model_dump_json()) for m in request.messages]


def test_a_label_the_pool_lacks_is_answered_the_same_in_every_process() -> None:
    # Rows shown with labels tied in count: the answer takes the first in sorted order. Set
    # order changes with each process's string hashing (PYTHONHASHSEED), and a pick in set
    # order made two runs of the same benchmark job differ.
    import os
    import subprocess
    import sys

    script = (
        "from bench.retrieval_teacher import Prompt, RetrievalTeacher, Pool, EmbeddingTable\n"
        "import numpy as np\n"
        "labels = ['shipping', 'refund', 'billing']\n"
        "pool = Pool(['a', 'b', 'c'], labels, np.eye(3, dtype=np.float32))\n"
        "teacher = RetrievalTeacher(pool, EmbeddingTable(lambda t: np.eye(3)[: len(t)]))\n"
        "items = [{'text': t, 'label': label} for t, label in zip('xyz', labels)]\n"
        "prompt = Prompt(None, items, '', labels, 'absent')\n"
        "print(teacher._label_for(prompt, []))\n"
    )
    answers = {
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout.strip()
        for seed in range(1, 6)
    }
    assert answers == {"billing"}


def test_nearest_any_follows_every_text_shown_where_nearest_follows_the_labels_own(
    teacher: RetrievalTeacher,
) -> None:
    """A prompt asking for shipping that shows a shipping text and a billing one: `nearest`
    writes near the shipping text only, `nearest-any` (a teacher that does not sort what it is
    shown by label) near either."""
    prompt = Prompt(
        schema=None,
        items=[
            {"text": "my parcel is late", "label": "shipping"},
            {"text": "where is the box", "label": "billing"},
        ],
        instruction="",
        labels=["shipping", "billing"],
        expected_label="shipping",
    )
    shipping = teacher.pool.by_label["shipping"]
    by_label = teacher._nearest(prompt, "shipping", shipping)
    teacher.mode = "nearest-any"
    any_label = teacher._nearest(prompt, "shipping", shipping)
    assert sorted(by_label) == sorted(any_label) == sorted(shipping)
    texts = teacher.pool.texts
    assert [texts[i] for i in by_label[:2]] == ["my parcel is late", "the parcel never came"]
    assert {texts[i] for i in any_label[:2]} == {"my parcel is late", "where is the box"}
    with pytest.raises(ValueError, match="mode must be one of"):
        RetrievalTeacher(teacher.pool, teacher.embed, mode="nearby")

"""EndpointStudent against the project's fake OpenAI-compatible server, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from service.domain.answers import answers_match, gold_answer
from service.domain.evaluation import EvalRow
from service.domain.spec import TaskKind, TaskSpec
from service.domain.teacher import StructuredMode
from tests.fake_teacher.client import FakeTeacherProcess
from workers.students import EndpointStudent, StudentUnavailableError

MODEL = "student-x"
LABELS = ["sports", "weather", "cooking"]
TASK = TaskSpec(kind=TaskKind.classification, instructions="Classify the topic.", labels=LABELS)
QA = TaskSpec(kind=TaskKind.qa, instructions="Solve the problem.")

# Each input names its gold label, so the fake (which picks the enum value that occurs most in
# the last user message) answers it correctly: correct predictions are reachable end to end.
NAMED = [
    EvalRow(row_id="n1", input="a sports story: the match went to extra time", gold="sports"),
    EvalRow(row_id="n2", input="tomorrow's weather brings rain and wind", gold="weather"),
    EvalRow(row_id="n3", input="a cooking tip: rest the dough overnight", gold="cooking"),
]
UNNAMED = [
    EvalRow(row_id=f"u{i}", input=text, gold=gold)
    for i, (text, gold) in enumerate(
        [
            ("the striker scored twice before half time", "sports"),
            ("snow is expected across the north tonight", "weather"),
            ("simmer the sauce until it thickens", "cooking"),
            ("the goalkeeper saved a late penalty", "sports"),
        ]
    )
]
PROBLEMS = [
    EvalRow(row_id="q1", input="Tom has three apples and buys two more. How many now?", gold="5"),
    EvalRow(
        row_id="q2",
        input="A box holds six eggs. How many eggs are in four boxes?",
        gold="6 * 4 = <<6*4=24>>24\n#### 24",
    ),
]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeTeacherProcess]:
    with FakeTeacherProcess(models=(MODEL,)) as process:
        yield process


@pytest.fixture
def fake(server: FakeTeacherProcess) -> Iterator[FakeTeacherProcess]:
    server.reset()
    yield server
    server.configure(no_json_schema=False, down=False, latency_ms=0.0, refuse_params=[])


def student(
    fake: FakeTeacherProcess,
    task: TaskSpec = TASK,
    *,
    structured_mode: StructuredMode = StructuredMode.auto,
    max_concurrency: int = 8,
) -> EndpointStudent:
    return EndpointStudent(
        task,
        base_url=fake.base_url,
        model=MODEL,
        api_key="unused",
        structured_mode=structured_mode,
        max_concurrency=max_concurrency,
        max_retries=0,
    )


def test_classification_returns_labels_from_the_set(fake: FakeTeacherProcess) -> None:
    rows = NAMED + UNNAMED
    with student(fake) as s:
        predictions = s.predict(rows)
        assert s.structured_mode is StructuredMode.json_schema
    assert [p.row_id for p in predictions] == [r.row_id for r in rows]
    assert all(p.predicted in LABELS and p.error is None for p in predictions)
    assert all(p.correct == (p.predicted == r.gold) for p, r in zip(predictions, rows, strict=True))
    assert [p.correct for p in predictions[: len(NAMED)]] == [True] * len(NAMED)
    assert fake.stats()["by_status"] == {"200": len(rows)}


def test_classification_confidence_comes_from_the_label_tokens(
    fake: FakeTeacherProcess,
) -> None:
    with student(fake) as s:
        predictions = s.predict(NAMED + UNNAMED)
    for p in predictions:
        assert p.confidence is not None and 0.0 < p.confidence <= 1.0, p
    # The probability of one word token: from the fake's logprobs in [-2, 0).
    assert all(p.confidence is not None and p.confidence > 0.13 for p in predictions)
    assert len({p.confidence for p in predictions}) > 1  # per answer, not a constant


def test_a_server_without_logprobs_is_asked_without_them(fake: FakeTeacherProcess) -> None:
    fake.configure(refuse_params=["logprobs"])
    with student(fake, max_concurrency=1) as s:
        predictions = s.predict(NAMED)
    assert [p.predicted for p in predictions] == ["sports", "weather", "cooking"]
    assert all(p.confidence is None for p in predictions)
    assert fake.stats()["by_status"] == {"200": 3, "400": 1}  # refused once, then remembered


def test_concurrency_is_bounded(fake: FakeTeacherProcess) -> None:
    fake.configure(latency_ms=50.0)
    with student(fake, max_concurrency=4) as s:
        s.predict((NAMED + UNNAMED) * 4)
    assert 1 < fake.stats()["max_in_flight"] <= 4


def test_server_without_json_schema_falls_back_once(fake: FakeTeacherProcess) -> None:
    fake.configure(no_json_schema=True)
    with student(fake) as s:
        predictions = s.predict(NAMED + UNNAMED)
        # The fake, like llama.cpp, still honours json_object with a schema.
        assert s.structured_mode is StructuredMode.json_object
    assert all(p.predicted in LABELS for p in predictions)
    assert [p.correct for p in predictions[: len(NAMED)]] == [True] * len(NAMED)
    assert fake.stats()["by_status"] == {"500": 1, "200": len(NAMED + UNNAMED)}


def test_plain_text_answers_are_mapped_or_marked_unparseable(fake: FakeTeacherProcess) -> None:
    rows = NAMED + UNNAMED
    with student(fake, structured_mode=StructuredMode.text) as s:
        predictions = s.predict(rows)
    for prediction in predictions:
        assert prediction.raw  # the fake writes free text from the prompt's words
        if prediction.predicted is None:
            assert prediction.correct is False
            assert prediction.error == "unparseable: no label from the label set in the reply"
        else:
            assert prediction.predicted in LABELS and prediction.error is None
    # The fake is deterministic: these rows exercise both the mapped and the unparseable path.
    assert {p.predicted is None for p in predictions} == {True, False}


def test_qa_without_a_final_answer_is_unparseable(fake: FakeTeacherProcess) -> None:
    # The fake's free text has no digits and no "####": nothing to extract.
    with student(fake, QA) as s:
        predictions = s.predict(PROBLEMS)
    for prediction in predictions:
        assert prediction.predicted is None and prediction.correct is False
        assert prediction.raw and prediction.error is not None
        assert prediction.error.startswith("unparseable: no final answer")


def test_qa_extracts_with_the_task_pattern_and_checks_against_gold(
    fake: FakeTeacherProcess,
) -> None:
    task = TaskSpec(kind=TaskKind.qa, instructions="Solve.", answer_pattern=r"^(\w+)")
    rows = [*PROBLEMS, EvalRow(row_id="q3", input="Which word comes first here?")]
    with student(fake, task) as s:
        predictions = s.predict(rows)
    for prediction, row in zip(predictions, rows, strict=True):
        assert prediction.raw is not None and prediction.predicted is not None
        assert prediction.raw.startswith(prediction.predicted)
        expected = (
            None if row.gold is None else answers_match(prediction.predicted, gold_answer(row.gold))
        )
        assert prediction.correct == expected


def test_score_demonstration_is_an_accuracy(fake: FakeTeacherProcess) -> None:
    demonstration = "Text: the referee stopped the game.\nLabel: sports"
    with student(fake) as s:
        assert s.score_demonstration(demonstration, NAMED) == 1.0
        mixed = s.score_demonstration(demonstration, NAMED + UNNAMED)
    assert 0.0 <= mixed <= 1.0
    assert mixed >= len(NAMED) / len(NAMED + UNNAMED)
    with student(fake, QA) as s:
        assert s.score_demonstration("Q: 1 + 1?\nA: 2\n#### 2", PROBLEMS) == 0.0


def test_unavailable_endpoint_raises(fake: FakeTeacherProcess) -> None:
    fake.configure(down=True)
    with student(fake) as s, pytest.raises(StudentUnavailableError):
        s.predict(NAMED)

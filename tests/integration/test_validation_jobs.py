"""Job creation checks every row of its datasets on real Postgres: the task's fields, label
types, labels outside the label set, and an empty held-out validation split are a 422 naming
the dataset, the line as uploaded and the field; a rejected job stores nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import Job, Teacher
from service.settings import Settings
from service.splits import load_job_rows
from service.tasks import RecordingTaskSender

NDJSON = "application/x-ndjson"
MISSING = object()


def _row(text: Any = "some text", label: Any = "pos", **extra: Any) -> dict[str, Any]:
    row = {**extra}
    if text is not MISSING:
        row["text"] = text
    if label is not MISSING:
        row["label"] = label
    return row


def _balanced(n: int, labels: tuple[Any, ...] = ("pos", "neg")) -> list[dict[str, Any]]:
    return [_row(f"row {i} for {lab}", lab) for i in range(n) for lab in labels]


class Api:
    def __init__(self, client: TestClient, auth: dict[str, str], session: Session) -> None:
        self.client, self.auth, self.session = client, auth, session

    def upload(self, rows: list[dict[str, Any]] | bytes) -> str:
        content = (
            rows
            if isinstance(rows, bytes)
            else "".join(json.dumps(r) + "\n" for r in rows).encode()
        )
        resp = self.client.post(
            "/v1/datasets", content=content, headers={**self.auth, "Content-Type": NDJSON}
        )
        assert resp.status_code in (200, 201), resp.text  # 200: the same upload again
        return str(resp.json()["id"])

    def spec(
        self,
        train: list[dict[str, Any]] | bytes,
        validation: list[dict[str, Any]] | bytes | None = None,
        test: list[dict[str, Any]] | bytes | None = None,
        **task: Any,
    ) -> dict[str, Any]:
        datasets = {"train": self.upload(train)}
        if validation is not None:
            datasets["validation"] = self.upload(validation)
        if test is not None:
            datasets["test"] = self.upload(test)
        return {
            "name": "validation-check",
            "strategy": "llm2llm",
            "task": {"kind": "classification", "instructions": "Classify.", **task},
            "datasets": datasets,
            # Inline, so that a rejected job would also leave a stray teacher behind.
            "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "m"},
            "student": {"type": "builtin", "model": "tfidf"},
        }

    def stored(self) -> tuple[int, int]:
        jobs = self.session.scalar(select(func.count()).select_from(Job)) or 0
        teachers = self.session.scalar(select(func.count()).select_from(Teacher)) or 0
        return jobs, teachers

    def rejected(self, spec: dict[str, Any], sender: RecordingTaskSender) -> dict[str, Any]:
        before, sent = self.stored(), len(sender.sent)
        resp = self.client.post("/v1/jobs", json=spec, headers=self.auth)
        assert resp.status_code == 422, resp.text
        assert self.stored() == before
        assert len(sender.sent) == sent
        error: dict[str, Any] = resp.json()["error"]
        assert error["code"] == "validation_failed"
        return error

    def created(self, spec: dict[str, Any]) -> dict[str, Any]:
        resp = self.client.post("/v1/jobs", json=spec, headers=self.auth)
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body


@pytest.fixture
def api(client: TestClient, auth: dict[str, str], db_session: Session, settings: Settings) -> Api:
    settings.api.allow_private_teacher_urls = True
    return Api(client, auth, db_session)


# --------------------------------------------------------------------------- fields of rows


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_row(label=MISSING), "'label' is missing; every row needs a label"),
        (_row(label=None), "'label' is null; every row needs a label"),
        (_row(label=["pos"]), "'label' must be a label (a string, an integer or true/false), "),
        (_row(label={"v": "pos"}), "'label' must be a label"),
        (_row(label=1.5), "'label' must be a label"),
        (_row(text=MISSING), "'text' is missing"),
        (_row(text=None), "'text' is null"),
        (_row(text=12345), "'text' must be a string, got a number"),
        (_row(text=["a", "b"]), "'text' must be a string, got an array"),
    ],
)
def test_a_train_row_without_its_fields_is_named_by_line(
    api: Api, sender: RecordingTaskSender, bad: dict[str, Any], message: str
) -> None:
    rows = _balanced(6)
    # A blank line above the bad row: the line quoted is the one in the file, not the row count.
    content = b"".join(json.dumps(r).encode() + b"\n" for r in rows[:3])
    content += b"\n" + json.dumps(bad).encode() + b"\n"
    content += b"".join(json.dumps(r).encode() + b"\n" for r in rows[3:])
    error = api.rejected(api.spec(content), sender)
    assert error["details"][0]["field"] == "datasets.train"
    assert error["details"][0]["line"] == 5
    assert error["details"][0]["message"].startswith(message), error
    assert error["message"].startswith(f"datasets.train line 5: {message}")
    assert len(error["details"]) == 1


def test_validation_and_test_rows_are_checked_too(api: Api, sender: RecordingTaskSender) -> None:
    validation = [*_balanced(2), _row(label=None)]
    test = [_row(text=MISSING), *_balanced(2), _row(label=[1])]
    error = api.rejected(api.spec(_balanced(6), validation, test), sender)
    assert [(d["field"], d["line"]) for d in error["details"]] == [
        ("datasets.validation", 5),
        ("datasets.test", 1),
        ("datasets.test", 6),
    ]
    assert error["message"].startswith("datasets.validation line 5: 'label' is null")


def test_a_row_with_both_fields_wrong_gets_both_errors(
    api: Api, sender: RecordingTaskSender
) -> None:
    error = api.rejected(api.spec([*_balanced(6), {"text": 7, "other": 1}]), sender)
    assert [(d["line"], d["message"].split(" ")[0]) for d in error["details"]] == [
        (13, "'text'"),
        (13, "'label'"),
    ]


def test_custom_field_names_are_the_ones_named(api: Api, sender: RecordingTaskSender) -> None:
    rows = [{"sentence": f"s{i}", "sentiment": lab} for i in range(6) for lab in ("p", "n")]
    rows[7] = {"sentence": "s", "sentiment": None}
    spec = api.spec(rows, input_field="sentence", output_field="sentiment")
    error = api.rejected(spec, sender)
    assert error["details"] == [
        {
            "field": "datasets.train",
            "line": 8,
            "message": "'sentiment' is null; every row needs a label "
            "(a string, an integer or true/false)",
        }
    ]


def test_qa_answers_may_be_numbers_but_not_missing_or_true(
    api: Api, sender: RecordingTaskSender
) -> None:
    train = [{"question": f"q{i}", "answer": i % 2 + 0.5 if i % 3 else f"a {i}"} for i in range(6)]
    train += [{"question": f"r{i}", "answer": 7} for i in range(5)]  # held out: 1
    spec = api.spec(train, kind="qa", input_field="question", output_field="answer")
    assert api.created(spec)["spec"]["task"]["labels"] is None

    for bad, message in [
        ({"question": "q"}, "'answer' is missing; every row needs a string or a number"),
        ({"question": "q", "answer": True}, "'answer' must be a string or a number, got true"),
        ({"question": "q", "answer": {"n": 1}}, "'answer' must be a string or a number, got an"),
        ({"question": 3, "answer": "3"}, "'question' must be a string, got a number"),
    ]:
        spec = api.spec(
            [*train, bad], [{"question": "v", "answer": "1"}], kind="qa",
            input_field="question", output_field="answer",
        )  # fmt: skip
        error = api.rejected(spec, sender)
        assert error["details"][0]["line"] == 12
        assert error["details"][0]["message"].startswith(message), error


def test_generation_jobs_still_work(api: Api) -> None:
    train = [{"input": f"in {i}", "output": f"out {i}"} for i in range(4)]
    spec = api.spec(train, train, kind="generation", input_field="input", output_field="output")
    spec["strategy"] = "random"
    assert api.created(spec)["status"] == "queued"


# --------------------------------------------------------------------------- the label set


def test_validation_labels_outside_the_inferred_set_are_named(
    api: Api, sender: RecordingTaskSender
) -> None:
    validation = [*_balanced(3), _row(label="neutral"), _row(label="other"), _row(label="neutral")]
    error = api.rejected(api.spec(_balanced(6), validation), sender)
    assert error["message"] == "datasets.validation: labels outside the labels of datasets.train"
    assert error["details"] == [
        {
            "field": "datasets.validation",
            "message": 'not listed: ["neutral", "other"] (first on lines 7, 8)',
        }
    ]


def test_test_labels_outside_task_labels_are_named(api: Api, sender: RecordingTaskSender) -> None:
    spec = api.spec(_balanced(6), _balanced(2), [*_balanced(1), _row(label="meh")])
    spec["task"]["labels"] = ["pos", "neg", "mixed"]
    error = api.rejected(spec, sender)
    assert error["message"] == "datasets.test: labels outside task.labels"
    assert error["details"] == [
        {"field": "datasets.test", "message": 'not listed: ["meh"] (first on line 3)'}
    ]
    spec["datasets"]["test"] = api.upload(_balanced(1, ("mixed", "neg")))
    assert api.created(spec)["spec"]["task"]["labels"] == ["pos", "neg", "mixed"]


def test_integer_labels_match_their_text_in_every_dataset(
    api: Api, sender: RecordingTaskSender
) -> None:
    # Train written with 0/1, validation with "0"/"1" (a pandas round trip): one label set.
    job = api.created(api.spec(_balanced(6, (1, 0)), _balanced(2, ("1", "0"))))
    assert job["spec"]["task"]["labels"] == ["0", "1"]
    spec = api.spec(_balanced(6, (1, 0)), _balanced(2, ("0", "1")))
    spec["task"]["labels"] = ["0", "1"]
    assert api.created(spec)["spec"]["task"]["labels"] == ["0", "1"]
    # true is "True", not "1": a validation set written with booleans does not match.
    spec["datasets"]["validation"] = api.upload(_balanced(2, (True, False)))
    error = api.rejected(spec, sender)
    assert error["message"] == "datasets.validation: labels outside task.labels"
    assert error["details"] == [
        {
            "field": "datasets.validation",
            "message": "not listed: [false, true] (first on lines 2, 1); "
            'labels are compared as text: false is "False", true is "True"',
        }
    ]


def test_labels_outside_task_labels_are_shown_as_written(
    api: Api, sender: RecordingTaskSender
) -> None:
    spec = api.spec([*_balanced(6, ("neg", "pos")), _row(label=1), _row(label="1")])
    spec["task"]["labels"] = ["neg", "pos"]
    error = api.rejected(spec, sender)
    assert error["message"] == "datasets.train: labels outside task.labels"
    assert error["details"] == [
        {
            "field": "task.labels",
            "message": 'not listed: [1] (first on line 13); labels are compared as text: 1 is "1"',
        }
    ]

    spec = api.spec(_balanced(6, (True, False)))
    spec["task"]["labels"] = ["true", "false"]
    error = api.rejected(spec, sender)
    assert error["details"][0]["message"] == (
        "not listed: [false, true] (first on lines 2, 1); labels are compared as text: "
        'false is "False", true is "True"'
    )
    spec["task"]["labels"] = ["True", "False"]
    assert api.created(spec)["spec"]["task"]["labels"] == ["True", "False"]


def test_boolean_labels_are_inferred_as_text(api: Api, sender: RecordingTaskSender) -> None:
    job = api.created(api.spec(_balanced(6, (True, False)), _balanced(2, (False, True))))
    assert job["spec"]["task"]["labels"] == ["False", "True"]
    error = api.rejected(api.spec(_balanced(6, (True,))), sender)
    assert error["details"] == [{"field": "task.labels", "message": "seen [true]"}]


# --------------------------------------------------------------------------- held-out split


def test_a_train_set_too_small_to_hold_out_from_needs_a_validation_set(
    api: Api, sender: RecordingTaskSender
) -> None:
    for per_class in (2, 4):  # 20% of 4 rows rounds down to none
        error = api.rejected(api.spec(_balanced(per_class)), sender)
        assert error["message"].startswith("datasets.validation: no validation rows: ")
        assert error["details"][0]["field"] == "datasets.validation"
        assert (
            "give datasets.validation, or at least 5 train rows per class"
            in (error["details"][0]["message"])
        )
    assert api.created(api.spec(_balanced(2), _balanced(1)))["status"] == "queued"
    assert api.created(api.spec(_balanced(5)))["status"] == "queued"


def test_a_qa_train_set_with_distinct_answers_holds_out_a_slice_of_all_rows(
    api: Api, sender: RecordingTaskSender, db_session: Session
) -> None:
    train = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    spec = api.spec(train, kind="qa", input_field="question", output_field="answer")
    job = api.created(spec)
    stored = db_session.get(Job, job["id"])
    assert stored is not None
    split = load_job_rows(db_session, stored)  # answers all differ: not grouped by answer
    assert (len(split.train), len(split.validation)) == (16, 4)
    # Too few rows to hold any out is still refused, with how to fix it.
    error = api.rejected(
        api.spec(train[:3], kind="qa", input_field="question", output_field="answer"), sender
    )
    assert error["details"][0]["field"] == "datasets.validation"
    assert "give datasets.validation" in error["message"]


def test_a_class_too_small_to_hold_out_from_is_fine(api: Api, db_session: Session) -> None:
    # 12 positive rows and one negative, no validation set: validation has positives only.
    rows = [_row(f"p{i}", "pos") for i in range(12)] + [_row("n0", "neg")]
    job = api.created(api.spec(rows))
    assert job["spec"]["task"]["labels"] == ["neg", "pos"]
    stored = db_session.get(Job, job["id"])
    assert stored is not None
    split = load_job_rows(db_session, stored)  # what the workers evaluate on
    assert [r.output for r in split.validation] == ["pos", "pos"]
    assert sorted(r.output for r in split.train) == ["neg"] + ["pos"] * 10

"""External student: the loop waits for predictions posted over REST by the user's trainer."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from service.models import Job, Prediction
from service.splits import load_job_rows
from tests.data_factory import question_slice
from tests.integration.conftest import InlineStack
from workers.inline import InlineTaskSender


@pytest.fixture
def loop(
    inline_stack: InlineStack,
) -> tuple[TestClient, dict[str, str], InlineTaskSender, Any, str]:
    st = inline_stack
    return st.client, st.auth, st.sender, st.sessions, st.teacher.base_url


def _post(client: TestClient, auth: dict[str, str], n: int, job_id: str, body: Any) -> Any:
    return client.post(f"/v1/jobs/{job_id}/iterations/{n}/feedback", json=body, headers=auth)


def test_external_feedback_round_trip(loop: Any) -> None:
    client, auth, sender, sessions, teacher_url = loop
    train, val = question_slice(per_class=4, val_per_class=4)
    ids = [
        client.post(
            "/v1/datasets", content=data, headers={**auth, "Content-Type": "application/x-ndjson"}
        ).json()["id"]
        for data in (train, val)
    ]
    spec = {
        "name": "external",
        "strategy": "llm2llm",
        "task": {"instructions": "Classify the question."},
        "datasets": {"train": ids[0], "validation": ids[1]},
        "teacher": {"base_url": teacher_url, "model": "fake-teacher"},
        "student": {"type": "external"},
        "budget": {"max_iterations": 1},
    }
    job = client.post("/v1/jobs", json=spec, headers=auth).json()
    sender.run_until_idle()
    job_id = job["id"]
    it0 = client.get(f"/v1/jobs/{job_id}/iterations/0", headers=auth).json()
    assert it0["status"] == "awaiting_feedback"
    assert (
        "waiting for feedback"
        in client.get(f"/v1/jobs/{job_id}", headers=auth).json()["status_reason"]
    )

    rows = client.get(f"/v1/jobs/{job_id}/evaluation-rows", headers=auth).json()
    assert {r["split"] for r in rows} == {"validation", "train"}  # LLM2LLM mines the seed set
    gold = {json_row["row_id"]: None for json_row in rows}
    labels = job["spec"]["task"]["labels"]

    def count() -> int:
        with sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Prediction)))

    # Bad feedback: unknown id, missing rows, a label outside the set → 422, nothing stored.
    unknown = _post(
        client,
        auth,
        0,
        job_id,
        {"predictions": [{"row_id": str(uuid.uuid4()), "predicted": labels[0]}]},
    )
    assert unknown.status_code == 422
    messages = [d["message"] for d in unknown.json()["error"]["details"]]
    assert "unknown row id" in messages
    assert any("required rows have no prediction" in m for m in messages)
    outside = _post(
        client,
        auth,
        0,
        job_id,
        {"predictions": [{"row_id": r["row_id"], "predicted": "NOT-A-LABEL"} for r in rows]},
    )
    assert outside.status_code == 422
    assert "not in the label set" in outside.json()["error"]["details"][0]["message"]
    not_json = client.post(
        f"/v1/jobs/{job_id}/iterations/0/feedback",
        content=b"{",
        headers={**auth, "Content-Type": "application/json"},
    )
    assert not_json.status_code == 422
    not_utf8 = client.post(
        f"/v1/jobs/{job_id}/iterations/0/feedback",
        content=b'{"row_id": "\xff"}\n',
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert not_utf8.status_code == 422 and "UTF-8" in not_utf8.json()["error"]["message"]
    with_nul = [{"row_id": r["row_id"], "predicted": labels[0], "raw": "a\u0000b"} for r in rows]
    nul = _post(client, auth, 0, job_id, {"predictions": with_nul})
    assert nul.status_code == 422 and "NUL" in nul.json()["error"]["message"]
    assert count() == 0

    # Complete feedback (every prediction the first label: mostly wrong) lets the loop go on.
    good = [{"row_id": r["row_id"], "predicted": labels[0], "confidence": 0.9} for r in rows]
    resp = _post(client, auth, 0, job_id, {"predictions": good})
    assert resp.status_code == 202, resp.text
    assert _post(client, auth, 0, job_id, {"predictions": good}).status_code == 409
    sender.run_until_idle()
    assert count() == len(gold)
    it0 = client.get(f"/v1/jobs/{job_id}/iterations/0", headers=auth).json()
    assert it0["status"] == "completed"
    # Iteration 0 shows the teacher nothing, so its metric is on every validation row: the
    # share of them whose gold is the first label.
    with sessions() as s:
        job_row = s.get(Job, uuid.UUID(job_id))
        assert job_row is not None
        validation = load_job_rows(s, job_row).validation
    judged = [r.output for r in validation]
    assert it0["metric"] == pytest.approx(judged.count(labels[0]) / len(judged))
    it1 = client.get(f"/v1/jobs/{job_id}/iterations/1", headers=auth).json()
    assert it1["examples_accepted"] > 0
    assert it1["status"] == "awaiting_feedback"

    # JSONL works too; the job then finishes by its iteration budget.
    # A raw answer holding U+2028 (json.dumps writes it unescaped) stays one line.
    jsonl = "\n".join(
        f'{{"row_id": "{r["row_id"]}", "predicted": "{labels[1]}", "raw": "a\u2028b"}}'
        for r in rows
    ).encode()
    resp = client.post(
        f"/v1/jobs/{job_id}/iterations/1/feedback",
        content=jsonl,
        headers={**auth, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 202, resp.text
    sender.run_until_idle()
    final = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert final["status"] == "succeeded"
    assert final["best_iteration"] in (0, 1)

"""Refresh: the next iteration of a finished job, aimed at its latest student's errors."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from service.jobs import STUDENT_PRIVATE_KEY
from service.models import GenerationBatch, Iteration, Job, JobRefresh
from tests.data_factory import question_slice
from tests.fake_teacher.client import FakeTeacherProcess
from tests.integration.conftest import InlineStack


def _refresh(st: InlineStack, job_id: str, body: Any = None, key: str | None = None) -> Any:
    headers = {**st.auth, **({"Idempotency-Key": key} if key else {})}
    return st.client.post(f"/v1/jobs/{job_id}/refresh", json=body, headers=headers)


def _iterations(st: InlineStack, job_id: str) -> list[dict[str, Any]]:
    body: list[dict[str, Any]] = st.client.get(
        f"/v1/jobs/{job_id}/iterations", headers=st.auth
    ).json()
    return body


def _finished_job(st: InlineStack, **changes: Any) -> str:
    job_id = st.create_job(st.job_spec(**changes))
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded", st.job(job_id)
    return job_id


def test_refresh_reopens_a_finished_job_for_one_more_iteration(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _finished_job(st)
    before = _iterations(st, job_id)
    assert [it["number"] for it in before] == [0, 1]

    resp = _refresh(st, job_id, {"note": "commit abc123 https://ci.example/run/7"})
    assert resp.status_code == 202, resp.text
    refresh = resp.json()
    assert refresh["status"] == "pending" and refresh["outcome"] == "waiting"
    assert refresh["job_status"] == "running"  # reopened; the loop starts the refresh

    st.sender.run_until_idle()
    after = _iterations(st, job_id)
    assert [it["number"] for it in after] == [0, 1, 2]
    new = after[2]
    assert new["status"] == "completed" and new["targets_count"] > 0
    assert new["note"] == "commit abc123 https://ci.example/run/7"
    assert new["refresh_id"] == refresh["id"]
    job = st.job(job_id)
    assert job["status"] == "succeeded" and job["finished_at"] is not None
    assert job["spec"]["budget"]["max_iterations"] == 2  # one more, counted from the refresh

    done = st.client.get(f"/v1/jobs/{job_id}/refreshes/{refresh['id']}", headers=st.auth).json()
    assert done["status"] == "started" and done["outcome"] == "succeeded"
    assert done["iteration"] == 2 and done["student_iteration"] == 2
    assert done["metric"] == new["metric"]
    assert done["baseline_metric"] == max(it["metric"] for it in before)
    assert [it["number"] for it in done["iterations"]] == [2]
    listed = st.client.get(f"/v1/jobs/{job_id}/refreshes", headers=st.auth).json()
    assert [r["id"] for r in listed] == [refresh["id"]]


def test_the_same_idempotency_key_twice_starts_one_refresh(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _finished_job(st)
    body = {"note": "run 42", "extra_budget": {"iterations": 1}}
    first = _refresh(st, job_id, body, key="ci-run-42")
    second = _refresh(st, job_id, body, key="ci-run-42")
    assert first.status_code == 202 and second.status_code == 200, second.text
    assert first.json()["id"] == second.json()["id"]
    st.sender.run_until_idle()
    # Retried after the refresh ran: still the same one, and no further iteration.
    third = _refresh(st, job_id, body, key="ci-run-42")
    assert third.status_code == 200 and third.json()["id"] == first.json()["id"]
    st.sender.run_until_idle()
    assert [it["number"] for it in _iterations(st, job_id)] == [0, 1, 2]
    with st.sessions() as s:
        assert len(s.scalars(select(JobRefresh)).all()) == 1

    other = _refresh(st, job_id, {"note": "another body"}, key="ci-run-42")
    assert other.status_code == 409
    assert other.json()["error"]["details"][0]["field"] == "Idempotency-Key"


def test_refresh_after_new_external_predictions_aims_at_the_new_errors(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    train, val = question_slice(per_class=4, val_per_class=3)
    spec = st.job_spec(
        train=train,
        validation=val,
        strategy="llm2llm",  # mines the seed rows the student gets wrong
        student={"type": "external"},
        params={"examples_per_error": 1},
    )
    job_id = st.create_job(spec)
    st.sender.run_until_idle()
    rows = st.client.get(f"/v1/jobs/{job_id}/evaluation-rows", headers=st.auth).json()
    labels = st.job(job_id)["spec"]["task"]["labels"]
    gold = {json_row["row_id"]: json_row for json_row in rows}
    train_ids = [r["row_id"] for r in rows if r["split"] == "train"]

    def feedback(n: int, wrong: set[str]) -> None:
        predictions = []
        for row_id in gold:
            truth = _gold_label(st, job_id, row_id)
            other = next(label for label in labels if label != truth)
            predictions.append({"row_id": row_id, "predicted": other if row_id in wrong else truth})
        resp = st.client.post(
            f"/v1/jobs/{job_id}/iterations/{n}/feedback",
            json={"predictions": predictions},
            headers=st.auth,
        )
        assert resp.status_code == 202, resp.text
        st.sender.run_until_idle()

    first_errors = set(train_ids[:6])
    feedback(0, first_errors)  # iteration 1 is planned from these and then waits
    assert _iterations(st, job_id)[1]["status"] == "awaiting_feedback"
    # A refresh now is refused: the student's predictions must come first.
    early = _refresh(st, job_id, {"note": "too early"})
    assert early.status_code == 409 and early.json()["error"]["code"] == "awaiting_feedback"

    new_errors = set(train_ids[-3:])  # the student retrained in CI gets other rows wrong
    feedback(1, new_errors)
    assert st.job(job_id)["status"] == "succeeded"
    resp = _refresh(st, job_id, {"note": "ci 2"})
    assert resp.status_code == 202, resp.text
    st.sender.run_until_idle()

    its = _iterations(st, job_id)
    assert [it["number"] for it in its] == [0, 1, 2]
    assert its[2]["status"] == "awaiting_feedback" and its[2]["note"] == "ci 2"
    assert _target_rows(st, job_id, 1) == _stable(st, job_id, first_errors)
    assert _target_rows(st, job_id, 2) == _stable(st, job_id, new_errors)
    refresh = st.client.get(
        f"/v1/jobs/{job_id}/refreshes/{resp.json()['id']}", headers=st.auth
    ).json()
    # The refreshed student is the one whose predictions were posted to iteration 1; the new
    # iteration's data is what it learns from next, so the export to train on includes it.
    assert refresh["outcome"] == "ready_for_student"
    assert refresh["student_iteration"] == 1 and refresh["metric"] == its[1]["metric"]
    assert refresh["baseline_metric"] == its[0]["metric"]
    assert refresh["dataset_iteration"] == 2

    # The export to train on holds iteration 2's rows; the best dataset does not, yet.
    def export_rows(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        resp = st.client.post(f"/v1/jobs/{job_id}/exports", json=body, headers=st.auth)
        assert resp.status_code == 202, resp.text
        st.sender.run_until_idle()
        done = st.client.get(f"/v1/exports/{resp.json()['id']}", headers=st.auth).json()
        assert done["status"] == "succeeded", done
        return int(done["row_count"]), done["manifest"]

    as_of, manifest = export_rows({"format": "jsonl", "iteration": 2})
    best, _ = export_rows({"format": "jsonl"})
    assert manifest["through_iteration"] == 2
    best_number = st.job(job_id)["best_iteration"]
    newer = [it for it in its if it["included"] and best_number < it["number"] <= 2]
    assert its[2] in newer and its[2]["examples_accepted"] > 0
    assert as_of - best == sum(it["examples_accepted"] for it in newer)
    too_far = st.client.post(
        f"/v1/jobs/{job_id}/exports", json={"format": "jsonl", "iteration": 3}, headers=st.auth
    )
    assert too_far.status_code == 422 and "iteration" in too_far.json()["error"]["message"]


def _gold_label(st: InlineStack, job_id: str, row_id: str) -> str:
    from service.models import DatasetRow

    with st.sessions() as s:
        row = s.get(DatasetRow, uuid.UUID(row_id))
        assert row is not None
        return str(row.data["label"])


def _stable(st: InlineStack, job_id: str, row_ids: set[str]) -> set[str]:
    from service.models import Job
    from service.splits import load_job_rows

    with st.sessions() as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None
        rows = load_job_rows(s, job)
        return {str(rows.stable_id(uuid.UUID(r))) for r in row_ids}


def _target_rows(st: InlineStack, job_id: str, number: int) -> set[str]:
    with st.sessions() as s:
        iteration = s.scalar(
            select(Iteration).where(
                Iteration.job_id == uuid.UUID(job_id), Iteration.number == number
            )
        )
        assert iteration is not None
        batches = s.scalars(
            select(GenerationBatch).where(GenerationBatch.iteration_id == iteration.id)
        ).all()
        # The rows aimed at as errors (LLM2LLM also covers labels with no error: "coverage").
        return {
            t["source_row_id"] for b in batches for t in b.targets if t["reason"] == "wrong_seed"
        }


@pytest.fixture
def student_server() -> Iterator[FakeTeacherProcess]:
    with FakeTeacherProcess(models=("student-v1", "student-v2")) as server:
        yield server


def test_an_endpoint_students_new_revision_is_evaluated_first(
    inline_stack: InlineStack, student_server: FakeTeacherProcess
) -> None:
    st = inline_stack
    job_id = _finished_job(
        st, student={"type": "endpoint", "base_url": student_server.base_url, "model": "student-v1"}
    )
    resp = _refresh(st, job_id, {"student": {"model": "student-v2", "revision": "ckpt-9"}})
    assert resp.status_code == 202, resp.text
    st.sender.run_until_idle()
    its = _iterations(st, job_id)
    assert [it["number"] for it in its] == [0, 1, 2, 3]
    evaluation, generation = its[2], its[3]
    # The revision's own evaluation: no data, a metric; then an iteration planned from it.
    assert evaluation["targets_count"] == 0 and evaluation["metric"] is not None
    assert generation["targets_count"] > 0 and generation["status"] == "completed"
    assert evaluation["refresh_id"] == generation["refresh_id"] == resp.json()["id"]
    job = st.job(job_id)
    assert job["status"] == "succeeded"
    assert job["spec"]["student"]["model"] == "student-v2"
    refresh = st.client.get(
        f"/v1/jobs/{job_id}/refreshes/{resp.json()['id']}", headers=st.auth
    ).json()
    assert refresh["outcome"] == "succeeded"
    assert refresh["student_iteration"] == 2 and refresh["iteration"] == 3
    assert refresh["metric"] == evaluation["metric"]
    assert refresh["student"] == {"model": "student-v2", "revision": "ckpt-9"}
    assert refresh["dataset_iteration"] == 3

    # A revision the server does not serve: the evaluation fails, and so does the job.
    bad = _refresh(st, job_id, {"student": {"model": "no-such-model"}})
    assert bad.status_code == 202
    st.sender.run_until_idle()
    failed = st.client.get(f"/v1/jobs/{job_id}/refreshes/{bad.json()['id']}", headers=st.auth)
    assert failed.json()["outcome"] == "failed"
    assert "student" in (failed.json()["job_status_reason"] or "")


def test_refresh_refusals_name_the_reason(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _finished_job(st, budget={"max_iterations": 1, "max_tokens": 10})
    spent = _refresh(st, job_id)
    assert spent.status_code == 422
    assert spent.json()["error"]["details"][0]["field"] == "extra_budget.tokens"
    builtin = _refresh(st, job_id, {"student": {"model": "x"}, "extra_budget": {"tokens": 5}})
    assert builtin.status_code == 422 and "builtin" in builtin.json()["error"]["message"]
    unknown = _refresh(st, job_id, {"students": {}})
    assert unknown.status_code == 422
    too_many = _refresh(st, job_id, {"extra_budget": {"iterations": 1000, "tokens": 5}})
    assert too_many.status_code == 422
    missing = st.client.post(f"/v1/jobs/{uuid.uuid4()}/refresh", headers=st.auth)
    assert missing.status_code == 404

    cancelled = st.create_job(st.job_spec())
    assert st.client.post(f"/v1/jobs/{cancelled}/cancel", headers=st.auth).status_code == 202
    resp = _refresh(st, cancelled)
    assert resp.status_code == 409 and "cancelled" in resp.json()["error"]["message"]


def test_a_refresh_of_a_running_job_starts_when_its_iteration_completes(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = st.create_job(st.job_spec())
    assert _refresh(st, job_id).status_code == 409  # queued: nothing to refresh yet
    ran = 0

    def after_first_task() -> bool:
        nonlocal ran
        ran += 1
        return ran > 1

    st.sender.run_until_idle(after_first_task)  # the job starts; iteration 0 is under way
    assert st.job(job_id)["status"] == "running"
    resp = _refresh(st, job_id, {"note": "while running"})
    assert resp.status_code == 202 and resp.json()["status"] == "pending"
    st.sender.run_until_idle()
    its = _iterations(st, job_id)
    # The refresh took the loop's next decision: iteration 1 carries its note, and the job's
    # own budget (one iteration) is kept rather than cut.
    assert [it["number"] for it in its] == [0, 1]
    assert its[1]["note"] == "while running" and its[1]["refresh_id"] == resp.json()["id"]
    assert st.job(job_id)["status"] == "succeeded"
    done = st.client.get(f"/v1/jobs/{job_id}/refreshes/{resp.json()['id']}", headers=st.auth)
    assert done.json()["outcome"] == "succeeded" and done.json()["iteration"] == 1


def test_pausing_and_refreshing_resumes_the_job(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _finished_job(st)
    resp = _refresh(st, job_id, {"extra_budget": {"iterations": 2}})
    assert resp.status_code == 202
    assert st.client.post(f"/v1/jobs/{job_id}/pause", headers=st.auth).status_code == 202
    st.sender.run_until_idle()  # paused: the refresh waits
    assert [it["number"] for it in _iterations(st, job_id)] == [0, 1]
    second = _refresh(st, job_id, {"note": "resume with me"})
    assert second.status_code == 202 and st.job(job_id)["status"] == "running"
    st.sender.run_until_idle()
    its = _iterations(st, job_id)
    # Two refreshes, one after the other: the first asked for two iterations (the stopping
    # rule may end them early), the second starts at the decision point that follows.
    first_its = [it for it in its if it["refresh_id"] == resp.json()["id"]]
    second_its = [it for it in its if it["refresh_id"] == second.json()["id"]]
    assert first_its and first_its[0]["number"] == 2
    assert len(second_its) == 1 and second_its[0]["note"] == "resume with me"
    assert second_its[0]["number"] > first_its[0]["number"]
    assert st.job(job_id)["status"] == "succeeded"


def test_a_refresh_cannot_carry_the_students_key_to_a_host_it_is_not_for(
    inline_stack: InlineStack, student_server: FakeTeacherProcess
) -> None:
    st = inline_stack
    # The stack lets tenants send DISTILL_TEST_NO_SUCH_KEY to 127.0.0.1 only.
    job_id = _finished_job(
        st,
        student={
            "type": "endpoint",
            "base_url": student_server.base_url,
            "model": "student-v1",
            "api_key_env": "DISTILL_TEST_NO_SUCH_KEY",
        },
    )
    assert "127.0.0.1" in student_server.base_url
    moved = student_server.base_url.replace("127.0.0.1", "localhost")
    refused = _refresh(st, job_id, {"student": {"model": "student-v2", "base_url": moved}})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "key_env_not_allowed"
    assert error["details"][0]["field"] == "student.api_key_env"
    same_host = _refresh(st, job_id, {"student": {"model": "student-v2"}})
    assert same_host.status_code == 202, same_host.text


def test_a_refresh_to_a_new_student_url_records_whether_it_may_be_private(
    inline_stack: InlineStack, student_server: FakeTeacherProcess
) -> None:
    """The workers check a tenant's student connections by what the job records (see
    JobContext.student_public_only): a new URL brings its own allowance with it."""
    st = inline_stack
    job_id = _finished_job(
        st, student={"type": "endpoint", "base_url": student_server.base_url, "model": "student-v1"}
    )
    with st.sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        job.spec = {**job.spec, STUDENT_PRIVATE_KEY: False}  # as if it had been a public URL
        session.commit()
    moved = student_server.base_url.replace("127.0.0.1", "localhost")
    resp = _refresh(st, job_id, {"student": {"model": "student-v2", "base_url": moved}})
    assert resp.status_code == 202, resp.text
    assert resp.json()["student"] == {"model": "student-v2", "base_url": moved}  # nothing of ours
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded", st.job(job_id)
    with st.sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        assert job.spec["student"]["base_url"] == moved
        assert job.spec[STUDENT_PRIVATE_KEY] is True  # the stack's operator allows it

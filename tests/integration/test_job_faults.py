"""A teacher's faults never kill a job silently: retried, recorded, or failed fast with a reason."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import func, select

from service.models import Example, TeacherCall
from tests.data_factory import question_slice
from tests.e2e.conftest import wait_for
from tests.integration.conftest import InlineStack


def _job(st: InlineStack, *, teacher: dict[str, Any] | str, **changes: Any) -> str:
    return st.create_job(st.job_spec(name="faults", teacher=teacher, batch_size=4, **changes))


def test_wrong_key_fails_the_job_fast_with_the_reason(inline_stack: InlineStack) -> None:
    st = inline_stack
    st.teacher.configure(api_key="right-key")
    job_id = _job(
        st,
        teacher={
            "base_url": st.teacher.base_url,
            "model": "fake-teacher",
            "api_key_env": "DISTILL_TEST_NO_SUCH_KEY",
        },
    )
    started = time.monotonic()
    st.sender.run_until_idle()
    job = st.job(job_id)
    assert job["status"] == "failed"
    assert "401" in job["status_reason"]
    assert time.monotonic() - started < 30
    iterations = st.client.get(f"/v1/jobs/{job_id}/iterations", headers=st.auth).json()
    # The iteration that was generating ends with its job.
    assert iterations[-1]["status"] == "failed"
    assert all(it["status"] in ("completed", "failed") for it in iterations)


def test_unknown_model_fails_the_job_fast(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _job(st, teacher={"base_url": st.teacher.base_url, "model": "no-such-model"})
    st.sender.run_until_idle()
    job = st.job(job_id)
    assert job["status"] == "failed"
    assert "404" in job["status_reason"]


def test_unavailable_teacher_backs_off_and_resumes_by_itself(inline_stack: InlineStack) -> None:
    st = inline_stack
    st.teacher.configure(down=True)
    job_id = _job(
        st,
        teacher={
            "base_url": st.teacher.base_url,
            "model": "fake-teacher",
            "limits": {"max_concurrency": 4},
        },
    )
    with st.executing_in_background():
        wait_for(
            lambda: st.job(job_id)["status_reason"] == "teacher unavailable",
            120,
            "the job to report the teacher unavailable",
        )
        assert st.job(job_id)["status"] == "running"
        st.teacher.configure(down=False)
        job = wait_for(
            lambda: (j := st.job(job_id))["status"] == "succeeded" and j,
            180,
            "the job to resume and finish",
        )
        assert job["status_reason"] != "teacher unavailable"
        assert job["examples_accepted"] > 0


def test_malformed_output_is_kept_as_rejected_with_raw_text(inline_stack: InlineStack) -> None:
    st = inline_stack
    st.teacher.configure(malformed_rate=1.0)
    job_id = _job(st, teacher={"base_url": st.teacher.base_url, "model": "fake-teacher"})
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded"
    with st.sessions() as session:
        calls = session.scalars(select(TeacherCall)).all()
        invalid = [c for c in calls if c.status == "invalid"]
        assert invalid, "with every answer malformed some calls must stay invalid after re-asks"
        for call in invalid:
            example = session.scalar(select(Example).where(Example.teacher_call_id == call.id))
            assert example is not None, "invalid teacher output must be stored, not dropped"
            assert example.status == "rejected"
            assert example.rejection_reason == call.error_code
            assert example.input == (call.text or "")[:4000]
            assert example.input  # the raw text is kept
        assert all(c.reasks > 0 for c in invalid)
        n_accepted = session.scalar(
            select(func.count()).select_from(Example).where(Example.status == "accepted")
        )
        n_valid = sum(c.status == "succeeded" for c in calls)
        assert (n_accepted or 0) > 0 if n_valid else n_accepted == 0


def test_token_budget_stops_generation_cleanly(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _job(
        st,
        teacher={
            "base_url": st.teacher.base_url,
            "model": "fake-teacher",
            "limits": {"max_concurrency": 1},
        },
        budget={"max_iterations": 5, "max_tokens": 3000},
    )
    st.sender.run_until_idle()
    job = st.job(job_id)
    assert job["status"] == "succeeded"
    assert job["status_reason"] == "token budget reached"
    spent = job["tokens_in"] + job["tokens_out"]
    assert 3000 <= spent < 3000 + 3000  # at most one call in flight past the budget


def test_pause_takes_effect_within_a_batch_and_resume_finishes(inline_stack: InlineStack) -> None:
    st = inline_stack
    st.teacher.configure(latency_ms=150)
    job_id = _job(
        st,
        teacher={
            "base_url": st.teacher.base_url,
            "model": "fake-teacher",
            "limits": {"max_concurrency": 1},
        },
        budget={"max_iterations": 2},
    )

    with st.executing_in_background():
        wait_for(lambda: st.teacher_calls() >= 2, 60, "generation to start")
        paused = st.client.post(f"/v1/jobs/{job_id}/pause", headers=st.auth)
        assert paused.status_code == 202
        time.sleep(2.0)  # the running batch notices within its status poll and stops
        frozen = st.teacher_calls()
        time.sleep(1.5)
        assert st.teacher_calls() == frozen, "no teacher call may start while the job is paused"
        assert st.job(job_id)["status"] == "paused"
        resumed = st.client.post(f"/v1/jobs/{job_id}/resume", headers=st.auth)
        assert resumed.json()["status"] == "running"
        job = wait_for(
            lambda: (j := st.job(job_id))["status"] == "succeeded" and j,
            180,
            "the resumed job to finish",
        )
        iterations = st.client.get(f"/v1/jobs/{job_id}/iterations", headers=st.auth).json()
        assert [it["number"] for it in iterations] == [0, 1, 2]
        assert all(it["teacher_calls"] == it["targets_count"] for it in iterations[1:])
        assert job["examples_accepted"] > 0


def test_a_request_over_the_context_window_is_recorded_not_retried_forever(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    train, val = question_slice(per_class=3, val_per_class=4)
    long_text = "Why is the sky blue " + "and very, very far away " * 400 + "?"
    train += (json.dumps({"text": long_text, "label": "DESC"}) + "\n").encode()
    st.teacher.configure(context_tokens=3000)
    spec = st.job_spec(
        train=train, validation=val, name="context", strategy="rationales", batch_size=8
    )
    job_id = st.create_job(spec)
    st.sender.run_until_idle()  # returns: nothing is rescheduled for a request that cannot fit
    job = st.job(job_id)
    assert job["status"] == "succeeded", job
    with st.sessions() as session:
        failed = session.scalars(select(TeacherCall).where(TeacherCall.status == "failed")).all()
        assert [c.error_code for c in failed] == ["context_length"]
        assert failed[0].attempts == 1  # not retried: it can never succeed
        row = session.scalar(select(Example).where(Example.teacher_call_id == failed[0].id))
        assert row is not None and row.status == "rejected"
        assert row.rejection_reason == "teacher_context_length"
        assert row.rejection_detail is not None and "maximum context length" in row.rejection_detail
        accepted = session.scalar(
            select(func.count()).select_from(Example).where(Example.status == "accepted")
        )
        assert (accepted or 0) > 0  # the other rows went through


def test_llm2llm_with_a_built_in_student_mines_out_of_fold_mistakes(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = _job(
        st,
        teacher={"base_url": st.teacher.base_url, "model": "fake-teacher"},
        strategy="llm2llm",
    )
    st.sender.run_until_idle()
    job = st.job(job_id)
    assert job["status"] == "succeeded", job
    iterations = st.client.get(f"/v1/jobs/{job_id}/iterations", headers=st.auth).json()
    # In-sample, the student would score 100% on its own seeds and stop with nothing to mine.
    assert [it["number"] for it in iterations] == [0, 1]
    assert iterations[1]["targets_count"] > 0 and iterations[1]["teacher_calls"] > 0


def test_an_unknown_built_in_model_is_refused_or_fails_the_job_with_the_reason(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    spec = st.job_spec(name="typo", student={"type": "builtin", "model": "tfidff"})
    typo = st.client.post("/v1/jobs", json=spec, headers=st.auth)
    assert typo.status_code == 422  # a typo is caught when the job is created
    assert "tfidff" in typo.json()["error"]["message"]
    # A path is checked where it must exist, on the worker: the job fails with the reason.
    job_id = _job(
        st,
        teacher={"base_url": st.teacher.base_url, "model": "fake-teacher"},
        student={"type": "builtin", "model": "./no-such-encoder"},
    )
    st.sender.run_until_idle()
    job = st.job(job_id)
    assert job["status"] == "failed"
    assert "student error" in job["status_reason"]
    assert "no-such-encoder" in job["status_reason"]


def test_a_job_that_accepted_nothing_says_so(inline_stack: InlineStack) -> None:
    st = inline_stack
    st.teacher.configure(truncate_rate=1.0)  # every answer cut off at max_tokens
    job_id = _job(st, teacher={"base_url": st.teacher.base_url, "model": "fake-teacher"})
    st.sender.run_until_idle()
    job = st.job(job_id)
    assert job["status"] == "succeeded"
    assert job["examples_accepted"] == 0
    assert "no example accepted from" in job["status_reason"]
    assert "truncated=" in job["status_reason"]


def test_numeric_labels_are_exported_as_numbers(inline_stack: InlineStack) -> None:
    st = inline_stack
    train, val = question_slice(per_class=4, val_per_class=4)
    codes = {"ABBR": 0, "DESC": 1, "ENTY": 2, "HUM": 3, "LOC": 4, "NUM": 5}

    def numeric(data: bytes) -> bytes:
        rows = [json.loads(line) for line in data.decode().splitlines()]
        return "".join(
            json.dumps({"text": r["text"], "label": codes[r["label"]]}) + "\n" for r in rows
        ).encode()

    spec = st.job_spec(
        train=numeric(train),
        validation=numeric(val),
        name="../numeric/labels: 0-5",  # also a name that is no file name
        task={"instructions": "Classify the question type (0-5)."},
    )
    job_id = st.create_job(spec)
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded"
    export = st.client.post(f"/v1/jobs/{job_id}/exports", json={}, headers=st.auth).json()
    st.sender.run_until_idle()
    body = st.client.get(f"/v1/exports/{export['id']}/download", headers=st.auth)
    assert body.status_code == 200, body.text
    assert "numeric-labels-0-5-jsonl-" in body.headers["content-disposition"]
    manifest = st.client.get(f"/v1/exports/{export['id']}", headers=st.auth).json()["manifest"]
    assert manifest["job_status"] == "succeeded" and manifest["job_finished"] is True
    # Preference pairs exist only for ARTE: asking a PGKD job for them is an error, not 0 rows.
    dpo = st.client.post(f"/v1/jobs/{job_id}/exports", json={"format": "dpo"}, headers=st.auth)
    assert dpo.status_code == 422 and "arte" in dpo.json()["error"]["message"]
    labels = [json.loads(line)["label"] for line in body.text.splitlines()]
    assert labels and all(isinstance(label, int) for label in labels), labels[:5]
    assert set(labels) <= set(codes.values())


def test_a_cancelled_jobs_spend_and_examples_are_counted(inline_stack: InlineStack) -> None:
    st = inline_stack
    st.teacher.configure(latency_ms=200)
    job_id = _job(
        st,
        teacher={
            "base_url": st.teacher.base_url,
            "model": "fake-teacher",
            "limits": {"max_concurrency": 2},
        },
        budget={"max_iterations": 3},
    )

    with st.executing_in_background():
        wait_for(lambda: st.teacher_calls() >= 3, 60, "generation to be under way")
        assert st.client.post(f"/v1/jobs/{job_id}/cancel", headers=st.auth).status_code == 202
        wait_for(lambda: st.sender.pending() == 0, 60, "the executor to drain")
        time.sleep(1.0)  # the batch under way notices the cancel and closes
    job = st.job(job_id)
    assert job["status"] == "cancelled"
    with st.sessions() as session:
        paid_in, paid_out = session.execute(
            select(func.sum(TeacherCall.tokens_in), func.sum(TeacherCall.tokens_out))
        ).one()
        accepted = session.scalar(
            select(func.count()).select_from(Example).where(Example.status == "accepted")
        )
    assert paid_in > 0
    assert (job["tokens_in"], job["tokens_out"]) == (paid_in, paid_out)
    assert job["examples_accepted"] == accepted
    iterations = st.client.get(f"/v1/jobs/{job_id}/iterations", headers=st.auth).json()
    assert sum(it["tokens_in"] for it in iterations) == paid_in
    assert iterations[-1]["status"] == "cancelled"


def test_every_iteration_records_when_it_started(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _job(st, teacher={"base_url": st.teacher.base_url, "model": "fake-teacher"})
    st.sender.run_until_idle()
    iterations = st.client.get(f"/v1/jobs/{job_id}/iterations", headers=st.auth).json()
    assert [it["number"] for it in iterations] == [0, 1]
    for it in iterations:
        assert it["started_at"] is not None and it["finished_at"] is not None
        assert it["started_at"] <= it["finished_at"]


def test_the_same_spec_reuses_paid_answers_and_another_seed_asks_afresh(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    teacher = st.client.post(
        "/v1/teachers",
        json={"name": "shared", "base_url": st.teacher.base_url, "model": "fake-teacher"},
        headers=st.auth,
    ).json()["id"]
    first = _job(st, teacher=teacher)
    st.sender.run_until_idle()
    served = st.teacher.stats()["requests_total"]
    assert served > 0
    again = _job(st, teacher=teacher)
    st.sender.run_until_idle()
    assert st.job(again)["status"] == "succeeded"
    assert st.teacher.stats()["requests_total"] == served  # every answer came from the cache
    other = _job(st, teacher=teacher, seed=7)
    st.sender.run_until_idle()
    assert st.job(other)["status"] == "succeeded"
    assert st.teacher.stats()["requests_total"] > served  # a new seed is a new sample
    assert st.job(first)["examples_accepted"] == st.job(again)["examples_accepted"]

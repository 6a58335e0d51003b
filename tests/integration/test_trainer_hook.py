"""The trainer hook: the worker runs the operator's training command with the dataset, then
evaluates the endpoint student; tenants cannot make workers run commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from service.auth import get_or_create_tenant
from service.jobs import create_job, parse_spec
from service.tasks import SENDER
from tests.data_factory import question_slice
from tests.integration.conftest import InlineStack


def _spec(st: InlineStack, command: str) -> dict[str, Any]:
    train, val = question_slice(per_class=3, val_per_class=3)
    return {
        "name": "hook",
        "strategy": "llm2llm",
        "task": {"instructions": "Classify the question."},
        "datasets": {"train": st.upload(train), "validation": st.upload(val)},
        "teacher": {"base_url": st.teacher.base_url, "model": "fake-teacher"},
        "student": {
            "type": "endpoint",
            "base_url": st.teacher.base_url,
            "model": "fake-teacher",
            "trainer_command": command,
        },
        "budget": {"max_iterations": 1},
    }


def _run_as_operator(st: InlineStack, spec: dict[str, Any]) -> str:
    with st.sessions() as session:
        session.info[SENDER] = st.sender
        tenant = get_or_create_tenant(session, "t")
        job, _ = create_job(
            session,
            tenant.id,
            parse_spec(spec),
            allow_private_teacher=True,
            allow_trainer_command=True,
        )
        session.commit()
        job_id = str(job.id)
    st.sender.run_until_idle()
    return job_id


def test_tenants_cannot_set_a_trainer_command(inline_stack: InlineStack) -> None:
    st = inline_stack
    resp = st.client.post("/v1/jobs", json=_spec(st, "touch /tmp/pwned"), headers=st.auth)
    assert resp.status_code == 422
    assert resp.json()["error"]["details"][0]["field"] == "student.trainer_command"


def test_trainer_command_runs_each_iteration_with_the_dataset(
    inline_stack: InlineStack, tmp_path: Path
) -> None:
    st = inline_stack
    log = tmp_path / "trained.txt"
    script = tmp_path / "train.py"
    script.write_text(
        "import os, sys\n"
        "rows = open(sys.argv[1]).read().splitlines()\n"
        f"open({str(log)!r}, 'a').write(f'{{len(rows)}} {{os.environ[\"DISTILL_DATASET\"]}}\\n')\n"
    )
    job_id = _run_as_operator(st, _spec(st, f"{sys.executable} {script} {{dataset}}"))
    job = st.job(job_id)
    assert job["status"] == "succeeded", job
    runs = log.read_text().splitlines()
    assert len(runs) == 2  # iteration 0 (seed only) and iteration 1
    seed_rows = int(runs[0].split()[0])
    assert seed_rows == 6 * 3
    assert int(runs[1].split()[0]) == seed_rows + job["examples_accepted"]


def test_failing_trainer_fails_the_job_with_the_reason(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _run_as_operator(
        st, _spec(st, f"{sys.executable} -c \"import sys; sys.exit('no GPU today')\"")
    )
    job = st.job(job_id)
    assert job["status"] == "failed"
    assert "trainer command failed" in job["status_reason"]
    assert "no GPU today" in job["status_reason"]

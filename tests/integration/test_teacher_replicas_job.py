"""A job whose teacher has replicas: its calls are spread over every server, each answer once."""

from __future__ import annotations

from tests.fake_teacher.client import FakeTeacherProcess
from tests.integration.conftest import InlineStack


def test_a_jobs_calls_are_spread_over_the_teachers_replicas(inline_stack: InlineStack) -> None:
    st = inline_stack
    with FakeTeacherProcess(latency_ms=20) as second:
        st.teacher.configure(latency_ms=20)
        st.teacher.reset()
        spec = st.job_spec(
            teacher={
                "base_url": st.teacher.base_url,
                "replica_urls": [second.base_url],
                "model": "fake-teacher",
                "limits": {"max_concurrency": 4},
            }
        )
        job_id = st.create_job(spec)
        st.sender.run_until_idle()
        job = st.job(job_id)
        assert job["status"] == "succeeded", job
        first_stats, second_stats = st.teacher.stats(), second.stats()
    calls = st.teacher_calls()
    answered = [s["by_status"].get("200", 0) for s in (first_stats, second_stats)]
    assert sum(answered) == calls > 0  # every call answered once, by one of them
    assert min(answered) >= calls // 4, answered  # both took a share
    assert max(s["max_in_flight"] for s in (first_stats, second_stats)) <= 4
    assert first_stats["duplicate_successes"] == second_stats["duplicate_successes"] == 0

"""The generation pipeline claims the next batch while the current one sends; a batch claimed
ahead that never started is given back as it was, so a crash or an interruption loses nothing
and counts no crash against it."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from service.domain.statuses import BatchStatus
from service.domain.teacher import TeacherRequest, TeacherResult
from service.models import Example, GenerationBatch, TeacherCall
from service.tasks import BATCH_GENERATE, SENDER, RecordingTaskSender
from tests.data_factory import question_slice
from tests.integration.conftest import InlineStack
from workers import runtime
from workers.steps.generate import PIPELINE_SWITCH_INTERVAL_S, _Pipeline, generate_batch

CALLS = 16
BATCH = 4


def _job(st: InlineStack, *, batch: int = BATCH, window: int | None = None) -> str:
    """A job of exactly CALLS teacher calls, in CALLS / `batch` batches; `window` sets the
    teacher's concurrency cap."""
    train, val = question_slice(per_class=5, val_per_class=5)
    teacher: dict[str, Any] = {"base_url": st.teacher.base_url, "model": "fake-teacher"}
    if window is not None:
        teacher["limits"] = {"max_concurrency": window}
    spec = st.job_spec(
        train=train,
        validation=val,
        name="lookahead",
        strategy="random",
        params={"rows_per_iteration": CALLS, "examples_per_row": 1},
        budget={"max_iterations": 1, "max_examples_per_iteration": CALLS},
        batch_size=batch,
        teacher=teacher,
    )
    job_id = st.create_job(spec)
    st.sender.run_until_idle(should_stop=lambda: len(_batches(st, job_id)) > 0)
    return job_id


def _batches(st: InlineStack, job_id: str) -> list[GenerationBatch]:
    with st.sessions() as session:
        return list(
            session.scalars(
                select(GenerationBatch)
                .where(GenerationBatch.job_id == uuid.UUID(job_id))
                .order_by(GenerationBatch.index)
            )
        )


def _counts(st: InlineStack, job_id: str) -> tuple[int, int]:
    """(teacher calls stored, examples stored) of the job."""
    job = uuid.UUID(job_id)
    with st.sessions() as session:
        calls = session.scalar(select(func.count()).where(TeacherCall.job_id == job))
        examples = session.scalar(select(func.count()).where(Example.job_id == job))
    return calls or 0, examples or 0


def _finish_with_nothing_lost(st: InlineStack, job_id: str, recorded: RecordingTaskSender) -> None:
    """Deliver what the interrupted step sent; any worker then finishes the job with every
    call made once and nothing paid twice."""
    for message in recorded.sent:
        st.sender.send(message)
    st.sender.run_until_idle()
    assert st.job(job_id)["status"] == "succeeded"
    assert all(b.status is BatchStatus.succeeded for b in _batches(st, job_id))
    assert _counts(st, job_id) == (CALLS, CALLS)
    assert st.teacher.stats()["duplicate_successes"] == 0


class _StopsAfterOneBatch:
    """A teacher that takes the first batch's requests, waits until the pipeline holds the
    next batch too (claimed ahead), then fails: in its stream (the limiter lost Redis: the
    pipeline is interrupted) or when closed (the step crashes)."""

    def __init__(self, holding: Callable[[], int], *, crash: bool) -> None:
        self._holding = holding
        self._crash = crash

    async def stream(
        self, requests: AsyncIterator[TeacherRequest], **_: Any
    ) -> AsyncIterator[TeacherResult]:
        for _ in range(BATCH):
            await anext(requests)
        for _ in range(200):
            if await asyncio.to_thread(self._holding) == 2:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the pipeline never claimed a batch ahead")
        raise RuntimeError("the limiter lost Redis")
        yield  # an async generator, like the real stream

    async def aclose(self) -> None:
        if self._crash:
            raise RuntimeError("the step crashed")


@pytest.mark.parametrize("crash", [False, True], ids=["interrupted", "crashed"])
def test_a_batch_claimed_ahead_and_never_started_is_given_back_whole(
    inline_stack: InlineStack, crash: bool
) -> None:
    st = inline_stack
    job_id = _job(st)
    batches = _batches(st, job_id)
    assert len(batches) == CALLS // BATCH

    def holding() -> int:
        return sum(b.status is BatchStatus.running for b in _batches(st, job_id))

    teacher = _StopsAfterOneBatch(holding, crash=crash)
    ports = dataclasses.replace(runtime.process_ports(), make_teacher=lambda _: teacher)
    recorded = RecordingTaskSender()
    with st.sessions() as session:
        session.info[SENDER] = recorded
        if crash:
            with pytest.raises(RuntimeError, match="the step crashed"):
                generate_batch(session, batches[0].id, ports)
        else:
            generate_batch(session, batches[0].id, ports)

    first, ahead, *rest = _batches(st, job_id)
    # The batch that started is put back the way its failure says: a crash counted, or a
    # retry after the interruption with the teacher's retry clock started.
    assert first.status is BatchStatus.pending
    assert first.crashes == (1 if crash else 0)
    assert (first.unavailable_since is None) == crash
    # The batch claimed ahead is pending again at once: no crash, no retry clock, a message.
    assert ahead.status is BatchStatus.pending
    assert ahead.attempts == 1 and ahead.crashes == 0
    assert ahead.retry_at is None and ahead.unavailable_since is None
    assert (BATCH_GENERATE, (str(ahead.id),)) in [(m.name, m.args) for m in recorded.sent]
    # The others were never touched.
    assert all(b.status is BatchStatus.pending and b.attempts == 0 for b in rest)

    # Any worker then finishes the job with nothing lost and nothing paid twice.
    _finish_with_nothing_lost(st, job_id, recorded)


def test_one_pipeline_runs_every_batch_of_the_phase(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _job(st)
    batches = _batches(st, job_id)
    st.teacher.reset()
    with st.sessions() as session:
        session.info[SENDER] = RecordingTaskSender()
        generate_batch(session, batches[0].id, runtime.process_ports())
    after = _batches(st, job_id)
    assert all(b.status is BatchStatus.succeeded and b.attempts == 1 for b in after)
    stats = st.teacher.stats()
    assert stats["completions_ok"] == CALLS and stats["duplicate_successes"] == 0


def test_the_last_answers_are_stored_when_the_stream_ends_not_a_store_interval_later(
    inline_stack: InlineStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Answers are stored every STORE_EVERY_S; the stream's end cuts that wait short (the
    job's last stored answer ends its generation window). With an interval of a minute the run
    would wait it out."""
    import time

    from workers.steps import generate

    monkeypatch.setattr(generate, "STORE_EVERY_S", 60.0)
    st = inline_stack
    job_id = _job(st)
    batches = _batches(st, job_id)
    st.teacher.reset()
    started = time.monotonic()
    with st.sessions() as session:
        session.info[SENDER] = RecordingTaskSender()
        generate_batch(session, batches[0].id, runtime.process_ports())
    assert time.monotonic() - started < 30.0
    assert all(b.status is BatchStatus.succeeded for b in _batches(st, job_id))
    assert _counts(st, job_id) == (CALLS, CALLS)


# A first batch larger than the teacher's window is loaded in two parts: the window's worth of
# targets, sent at once, then the rest while those are answered.
WINDOW = 2
FIRST_PART_BATCH = 8


def _windowed_job(st: InlineStack) -> str:
    return _job(st, batch=FIRST_PART_BATCH, window=WINDOW)


class _Recording:
    """The real teacher, noting when the pipeline hands it each request."""

    def __init__(self, inner: Any, events: list[str]) -> None:
        self._inner = inner
        self._events = events

    async def stream(
        self, requests: AsyncIterator[TeacherRequest], **kwargs: Any
    ) -> AsyncIterator[TeacherResult]:
        async def noted() -> AsyncIterator[TeacherRequest]:
            async for request in requests:
                self._events.append("request")
                yield request

        async for result in self._inner.stream(noted(), **kwargs):
            yield result

    async def aclose(self) -> None:
        await self._inner.aclose()


def _generate_noting_requests(st: InlineStack, batch_id: uuid.UUID, events: list[str]) -> None:
    """Run the pipeline from `batch_id` on the real teacher, noting each request it sends in
    `events`."""
    real = runtime.process_ports()
    ports = dataclasses.replace(
        real, make_teacher=lambda row: _Recording(real.make_teacher(row), events)
    )
    st.teacher.reset()
    with st.sessions() as session:
        session.info[SENDER] = RecordingTaskSender()
        generate_batch(session, batch_id, ports)


def test_the_first_wave_goes_out_before_the_rest_of_the_first_batch_is_loaded(
    inline_stack: InlineStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = inline_stack
    job_id = _windowed_job(st)
    batches = _batches(st, job_id)
    assert len(batches) == CALLS // FIRST_PART_BATCH
    events: list[str] = []
    load_rest = _Pipeline._load_rest

    def noted_load_rest(self: _Pipeline, work: Any) -> list[TeacherRequest]:
        events.append(f"load_rest:{len(work.unloaded)}")
        return load_rest(self, work)

    monkeypatch.setattr(_Pipeline, "_load_rest", noted_load_rest)
    _generate_noting_requests(st, batches[0].id, events)

    # The window's worth of requests went out first, then the first batch's other six targets
    # were loaded; the second batch was loaded whole (claimed ahead).
    assert events[: WINDOW + 1] == ["request"] * WINDOW + [f"load_rest:{FIRST_PART_BATCH - WINDOW}"]
    assert events.count("request") == CALLS
    assert [e for e in events if e.startswith("load_rest")] == ["load_rest:6"]
    after = _batches(st, job_id)
    assert all(b.status is BatchStatus.succeeded and b.attempts == 1 for b in after)
    assert _counts(st, job_id)[1] == CALLS
    stats = st.teacher.stats()
    assert stats["completions_ok"] == CALLS and stats["duplicate_successes"] == 0


def test_each_batch_after_the_second_is_claimed_when_the_one_before_starts(
    inline_stack: InlineStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second batch is claimed once half of the first went out (not while the window
    fills); each later one as soon as the batch before it starts sending, while the database
    thread is free, not from its half on, when it is closing the batch before."""
    st = inline_stack
    usual = sys.getswitchinterval()
    job_id = _job(st)
    batches = _batches(st, job_id)
    assert len(batches) == CALLS // BATCH == 4
    events: list[str] = []
    intervals: list[float] = []
    claim_ahead = _Pipeline._claim_ahead

    def noted_claim_ahead(self: _Pipeline) -> Any:
        events.append("claim")
        intervals.append(sys.getswitchinterval())
        return claim_ahead(self)

    monkeypatch.setattr(_Pipeline, "_claim_ahead", noted_claim_ahead)
    _generate_noting_requests(st, batches[0].id, events)

    sent_before_each_claim = [
        events[:i].count("request") for i, e in enumerate(events) if e == "claim"
    ]
    assert sent_before_each_claim == [BATCH // 2, BATCH, 2 * BATCH, 3 * BATCH]
    # Threads switch quickly while the pipeline runs (`_quick_thread_switches`), not after.
    assert set(intervals) == {min(usual, PIPELINE_SWITCH_INTERVAL_S)}
    assert sys.getswitchinterval() == usual
    after = _batches(st, job_id)
    assert all(b.status is BatchStatus.succeeded and b.attempts == 1 for b in after)
    stats = st.teacher.stats()
    assert stats["completions_ok"] == CALLS and stats["duplicate_successes"] == 0


class _StopsAfterTheFirstWave:
    """The real teacher for the first wave of requests only: once those are answered it fails,
    in its stream (the pipeline is interrupted) or when closed (the step crashes), before the
    pipeline loaded the rest of its first batch."""

    def __init__(self, inner: Any, *, crash: bool) -> None:
        self._inner = inner
        self._crash = crash

    async def stream(
        self, requests: AsyncIterator[TeacherRequest], **kwargs: Any
    ) -> AsyncIterator[TeacherResult]:
        first = [await anext(requests) for _ in range(WINDOW)]

        async def first_wave() -> AsyncIterator[TeacherRequest]:
            for request in first:
                yield request

        async for result in self._inner.stream(first_wave(), **kwargs):
            yield result
        raise RuntimeError("the limiter lost Redis")

    async def aclose(self) -> None:
        await self._inner.aclose()
        if self._crash:
            raise RuntimeError("the step crashed")


@pytest.mark.parametrize("crash", [False, True], ids=["interrupted", "crashed"])
def test_a_first_batch_stopped_before_its_rest_was_loaded_loses_none_of_it(
    inline_stack: InlineStack, crash: bool
) -> None:
    st = inline_stack
    job_id = _windowed_job(st)
    batches = _batches(st, job_id)
    real = runtime.process_ports()
    ports = dataclasses.replace(
        real, make_teacher=lambda row: _StopsAfterTheFirstWave(real.make_teacher(row), crash=crash)
    )
    recorded = RecordingTaskSender()
    with st.sessions() as session:
        session.info[SENDER] = recorded
        if crash:
            with pytest.raises(RuntimeError, match="the step crashed"):
                generate_batch(session, batches[0].id, ports)
        else:
            generate_batch(session, batches[0].id, ports)

    # The first wave was answered and stored; the first batch is put back whole, not closed
    # with the part that was loaded, and its answers are not paid for again.
    assert _counts(st, job_id)[0] == WINDOW
    first = _batches(st, job_id)[0]
    assert first.status is BatchStatus.pending
    assert first.crashes == (1 if crash else 0)

    _finish_with_nothing_lost(st, job_id, recorded)


def test_a_first_batch_whose_rest_cannot_be_loaded_is_put_back_as_a_crash(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = _windowed_job(st)
    batches = _batches(st, job_id)
    with st.sessions() as session:
        batch = session.get(GenerationBatch, batches[0].id)
        assert batch is not None
        targets = list(batch.targets)
        targets[-1] = {"not": "a target"}  # past the first wave
        batch.targets = targets
        session.commit()
    with st.sessions() as session:
        session.info[SENDER] = RecordingTaskSender()
        with pytest.raises(ValueError, match="validation error"):
            generate_batch(session, batches[0].id, runtime.process_ports())

    # Not closed with the part that loaded: put back, its crash counted (a poison batch is
    # failed for good after max_crashes), and the answers of its first wave kept.
    first = _batches(st, job_id)[0]
    assert first.status is BatchStatus.pending and first.crashes == 1
    assert _counts(st, job_id) == (WINDOW, 0)

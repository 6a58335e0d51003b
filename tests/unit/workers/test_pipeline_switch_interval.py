"""While a generation pipeline runs, threads switch every millisecond, so the event loop gets
the GIL back quickly from the database thread closing a batch; the interpreter's own interval
comes back after the last pipeline of the process ends, however they overlap."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest

from workers.steps.generate import PIPELINE_SWITCH_INTERVAL_S, _quick_thread_switches

USUAL = 0.005  # CPython's default


@pytest.fixture(autouse=True)
def usual_interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    sys.setswitchinterval(USUAL)
    yield
    sys.setswitchinterval(before)


def test_a_pipeline_switches_quickly_and_restores_the_interval() -> None:
    with _quick_thread_switches():
        assert sys.getswitchinterval() == pytest.approx(PIPELINE_SWITCH_INTERVAL_S)
    assert sys.getswitchinterval() == pytest.approx(USUAL)


def test_the_interval_comes_back_after_the_last_of_overlapping_pipelines() -> None:
    first_in = threading.Event()
    first_may_leave = threading.Event()
    seen: list[float] = []

    def first() -> None:
        with _quick_thread_switches():
            first_in.set()
            first_may_leave.wait(10)

    thread = threading.Thread(target=first)
    thread.start()
    assert first_in.wait(10)
    with _quick_thread_switches():
        first_may_leave.set()
        thread.join(10)
        # The first pipeline ended while this one runs: still quick.
        seen.append(sys.getswitchinterval())
    seen.append(sys.getswitchinterval())
    assert seen == [pytest.approx(PIPELINE_SWITCH_INTERVAL_S), pytest.approx(USUAL)]


def test_a_pipeline_that_raises_restores_the_interval() -> None:
    with pytest.raises(RuntimeError), _quick_thread_switches():
        raise RuntimeError("the step crashed")
    assert sys.getswitchinterval() == pytest.approx(USUAL)


def test_a_shorter_interval_set_by_the_operator_is_kept() -> None:
    sys.setswitchinterval(0.0005)
    with _quick_thread_switches():
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == pytest.approx(0.0005)

"""The pool process's garbage collector settings."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from celery.signals import worker_process_init

from workers.celery_app import GC_GEN0_THRESHOLD


@pytest.fixture
def gc_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


@pytest.mark.usefixtures("gc_restored")
def test_a_pool_process_freezes_its_imports_and_collects_young_objects_less_often() -> None:
    gc.unfreeze()
    older = gc.get_threshold()[1:]
    worker_process_init.send(sender=None)
    assert gc.get_freeze_count() > 10_000  # the imported modules' objects
    assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *older)
    gc.collect()
    assert gc.get_freeze_count() > 10_000  # a full collection leaves the frozen objects alone

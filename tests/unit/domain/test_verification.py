"""Sampled teacher verification: which examples are verified first, and when the rest are."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.domain.spec import FilterSpec
from service.domain.verification import (
    SAMPLE_MIN,
    sample_for_verification,
    verify_the_rest,
)


def test_the_sample_is_a_fifth_at_least_ten_and_at_most_all() -> None:
    assert sample_for_verification([f"x{i}" for i in range(7)], "s") == set(range(7))
    assert len(sample_for_verification([f"x{i}" for i in range(30)], "s")) == SAMPLE_MIN
    assert len(sample_for_verification([f"x{i}" for i in range(101)], "s")) == 21
    assert sample_for_verification([], "s") == set()


def test_the_sample_depends_on_the_seed_and_the_keys_not_their_order() -> None:
    keys = [f"example {i}" for i in range(100)]
    picked = sample_for_verification(keys, "job-1")
    assert picked == sample_for_verification(keys, "job-1")
    assert picked != sample_for_verification(keys, "job-2")
    reversed_keys = keys[::-1]
    again = sample_for_verification(reversed_keys, "job-1")
    assert {reversed_keys[i] for i in again} == {keys[i] for i in picked}


@pytest.mark.parametrize(
    ("verified", "disagreed", "widen"),
    [
        (10, 0, False),
        (10, 1, False),  # one ambiguous text in ten is not a liar
        (10, 2, True),
        (3, 2, True),
        (20, 3, False),  # fewer than a fifth
        (20, 4, True),
        (0, 0, False),
    ],
)
def test_the_rest_is_verified_when_the_sample_disagrees_often(
    verified: int, disagreed: int, widen: bool
) -> None:
    assert verify_the_rest(verified, disagreed) is widen


@pytest.mark.parametrize(
    ("sample", "before", "widen"),
    [
        # A fifth of labels wrong: a sample of 10 shows 1; the job's 60 verified showed 13.
        ((10, 1), (60, 13), True),
        ((10, 0), (60, 14), True),  # 14 of 70: a fifth
        ((10, 0), (60, 13), False),  # 13 of 70: under a fifth
        # A truthful teacher with one unlucky batch widened (26 of 512 disagreed): sampled
        # again afterwards, its record far under a fifth.
        ((10, 1), (522, 27), False),
        # Its own sample still decides when the record is clean (a teacher that starts lying).
        ((10, 3), (600, 6), True),
        ((10, 1), (0, 0), False),
        # The record alone needs 2 disagreements, as a sample does.
        ((10, 0), (1, 1), False),
    ],
)
def test_the_jobs_record_widens_a_batch_its_sample_would_not(
    sample: tuple[int, int], before: tuple[int, int], widen: bool
) -> None:
    assert verify_the_rest(*sample, before=before) is widen


def test_the_spec_takes_true_false_or_sample() -> None:
    assert FilterSpec().teacher_verification is False
    assert FilterSpec(teacher_verification=True).teacher_verification is True
    assert FilterSpec(teacher_verification="sample").teacher_verification == "sample"
    with pytest.raises(ValidationError, match="teacher_verification"):
        FilterSpec(teacher_verification="some")

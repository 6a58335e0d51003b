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


def test_the_spec_takes_true_false_or_sample() -> None:
    assert FilterSpec().teacher_verification is False
    assert FilterSpec(teacher_verification=True).teacher_verification is True
    assert FilterSpec(teacher_verification="sample").teacher_verification == "sample"
    with pytest.raises(ValidationError, match="teacher_verification"):
        FilterSpec(teacher_verification="some")

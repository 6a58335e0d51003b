"""Teacher verification: the teacher labels a candidate's input on its own; keep on agreement.

`filters.teacher_verification: sample` verifies a seeded share of each batch first
(`sample_for_verification`) and the rest only when that share shows the teacher writing labels
it does not stand by, or the job's record so far does (`verify_the_rest`). On a truthful
teacher the check then costs a fifth of the calls that verifying everything does; on one whose
labels are often wrong it costs the same.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Final

from service.domain.prompts import build_request, item_fields
from service.domain.prompts.schemas import rationale_schema
from service.domain.spec import TaskSpec
from service.domain.strategies.rationales import answer_matches
from service.domain.teacher import TeacherRequest

# A fifth of a batch's accepted examples, at least 10: on 20% wrong labels a sample of 10 shows
# 2 or more in 62% of batches, on 50% in 99%; a truthful teacher that disagrees with itself on
# 5% of its examples (ambiguous texts) widens 9% of the batches it is sampled 10 of, and
# fewer of larger ones (the share needed is then a fifth of more examples).
SAMPLE_SHARE: Final = 0.2
SAMPLE_MIN: Final = 10
WIDEN_SHARE: Final = 0.2
WIDEN_MIN: Final = 2


def sample_for_verification(keys: Sequence[str], seed: str) -> set[int]:
    """Indexes of the examples to verify first: `SAMPLE_SHARE` of them (at least `SAMPLE_MIN`,
    at most all), chosen by a seeded hash of each one's key, so a batch run again picks the
    same ones (and its verification calls are the cached ones)."""
    n = min(len(keys), max(SAMPLE_MIN, math.ceil(SAMPLE_SHARE * len(keys))))
    order = sorted(
        range(len(keys)),
        key=lambda i: hashlib.sha256(f"{seed}\x00{keys[i]}".encode()).digest(),
    )
    return set(order[:n])


def verify_the_rest(verified: int, disagreed: int, *, before: tuple[int, int] = (0, 0)) -> bool:
    """Whether the disagreements seen say the teacher's labels are not to be trusted: at least
    `WIDEN_MIN` of them and at least `WIDEN_SHARE` of the examples verified, in this batch's
    sample or in the job so far (`before`: examples verified and disagreed with in its earlier
    batches, sampled or not, plus this sample). One disagreement in ten is an ambiguous text as
    often as a wrong label.

    The job's record is what a sample of 10 cannot be: a teacher whose labels are wrong a fifth
    of the time shows 2 of them in only 62% of samples of 10, so a batch in three kept its
    unchecked rest; after a few batches the job's record shows it in every one. And one that
    disagrees with itself on 5% of its texts widens a batch whose sample was unlucky, but its
    record (that batch's whole verification with the rest) stays under a fifth, so the
    batches after it are sampled again."""

    def says_so(verified: int, disagreed: int) -> bool:
        return disagreed >= WIDEN_MIN and disagreed >= WIDEN_SHARE * verified

    earlier_verified, earlier_disagreed = before
    return says_so(verified, disagreed) or says_so(
        verified + earlier_verified, disagreed + earlier_disagreed
    )


def verification_request(task: TaskSpec, labels: Sequence[str] | None, text: str) -> TeacherRequest:
    """The teacher is not shown the proposed answer, so agreement is not mere sycophancy."""
    input_field, _ = item_fields(task.kind)
    return build_request(
        "verify",
        params={"kind": str(task.kind), "instructions": task.instructions, "labels": labels},
        data={"row": [{input_field: text}]},
        response_schema=rationale_schema(task.kind, labels),
        schema_name="verification",
    )


def verification_agrees(task: TaskSpec, parsed: Any, proposed: str) -> bool:
    if not isinstance(parsed, dict) or not isinstance(parsed.get("answer"), str):
        return False
    return answer_matches(task, parsed["answer"], proposed)

"""The keep/exclude rule end to end, with an external student whose predictions the test writes:
noise keeps an iteration's data, a measurable drop excludes it, and a job whose every
iteration was excluded says so and exports the seed set, saying that too."""

from __future__ import annotations

import json
import uuid
from typing import Any

from service.models import DatasetRow, Job
from service.splits import load_job_rows
from tests.integration.conftest import InlineStack

LABELS = ("alarm", "music", "weather")
TOPICS = ("morning", "evening", "weekend", "holiday", "office", "kitchen", "garden", "car")


def _rows(per_label: int, offset: int) -> bytes:
    lines = [
        json.dumps(
            {
                "text": f"{label} request {i + offset} in the {TOPICS[i % len(TOPICS)]}",
                "label": label,
            }
        )
        for label in LABELS
        for i in range(per_label)
    ]
    return ("\n".join(lines) + "\n").encode()


def _start(st: InlineStack, **changes: Any) -> str:
    spec = st.job_spec(
        train=_rows(4, 0),
        validation=_rows(10, 100),
        strategy="llm2llm",
        student={"type": "external"},
        budget={"max_iterations": 3, "max_examples": 60},
        **changes,
    )
    job_id = st.create_job(spec)
    st.sender.run_until_idle()
    return job_id


def _gold(st: InlineStack, job_id: str) -> dict[str, tuple[str, str]]:
    """row id (as the API names it) → (split, gold label)."""
    rows = st.client.get(f"/v1/jobs/{job_id}/evaluation-rows", headers=st.auth).json()
    out = {}
    with st.sessions() as s:
        for row in rows:
            data = s.get(DatasetRow, uuid.UUID(row["row_id"]))
            assert data is not None
            out[row["row_id"]] = (row["split"], str(data.data["label"]))
    return out


def _post(
    st: InlineStack,
    job_id: str,
    n: int,
    wrong: set[str] | None = None,
    *,
    all_validation: bool = False,
) -> None:
    predictions = []
    for row_id, (split, gold) in _gold(st, job_id).items():
        is_wrong = (wrong is not None and row_id in wrong) or (
            all_validation and split == "validation"
        )
        other = next(label for label in LABELS if label != gold)
        predictions.append({"row_id": row_id, "predicted": other if is_wrong else gold})
    resp = st.client.post(
        f"/v1/jobs/{job_id}/iterations/{n}/feedback",
        json={"predictions": predictions},
        headers=st.auth,
    )
    assert resp.status_code == 202, resp.text
    st.sender.run_until_idle()


def _iteration(st: InlineStack, job_id: str, n: int) -> dict[str, Any]:
    body: dict[str, Any] = st.client.get(
        f"/v1/jobs/{job_id}/iterations/{n}", headers=st.auth
    ).json()
    return body


def _export(st: InlineStack, job_id: str) -> dict[str, Any]:
    resp = st.client.post(f"/v1/jobs/{job_id}/exports", json={"format": "jsonl"}, headers=st.auth)
    assert resp.status_code == 202, resp.text
    st.sender.run_until_idle()
    done: dict[str, Any] = st.client.get(f"/v1/exports/{resp.json()['id']}", headers=st.auth).json()
    assert done["status"] == "succeeded", done
    return done


def test_every_iteration_measurably_worse_is_excluded_and_the_job_says_so(
    inline_stack: InlineStack,
) -> None:
    st = inline_stack
    job_id = _start(st)
    train_rows = {r for r, (split, _) in _gold(st, job_id).items() if split == "train"}
    _post(st, job_id, 0, wrong=set(list(train_rows)[:4]))  # seed errors to aim at
    # The retrained student now gets every validation row wrong: measurably worse, twice.
    _post(st, job_id, 1, all_validation=True)
    first = _iteration(st, job_id, 1)
    assert first["examples_accepted"] > 0
    assert first["included"] is False and first["regressed"] is True
    assert first["selection_reason"].startswith("excluded: measurably worse than iteration 0")
    assert first["comparisons"][0]["high"] < 0
    _post(st, job_id, 2, all_validation=True)
    job = st.job(job_id)
    assert job["status"] == "succeeded"
    assert job["best_iteration"] == 0
    assert job["status_reason"].startswith("patience")
    assert "every iteration's examples were excluded" in job["status_reason"]
    assert "the export holds the seed set only (iteration 0)" in job["status_reason"]

    export = _export(st, job_id)
    manifest = export["manifest"]
    assert manifest["holds"] == "the seed rows only: no iteration's examples were kept"
    assert [it["included"] for it in manifest["iterations"]] == [True, False, False]
    assert export["row_count"] == len(train_rows)


def test_a_move_within_the_noise_keeps_the_data_and_a_tie_too(inline_stack: InlineStack) -> None:
    st = inline_stack
    job_id = _start(st)
    gold = _gold(st, job_id)
    train_rows = sorted(r for r, (split, _) in gold.items() if split == "train")
    _post(st, job_id, 0, wrong=set(train_rows[:4]))
    # One validation row the earlier student got right is now wrong: noise.
    with st.sessions() as s:
        job = s.get(Job, uuid.UUID(job_id))
        assert job is not None
        rows = load_job_rows(s, job)
    judge = [str(rows.row_uuid[r.row_id]) for r in rows.validation]
    _post(st, job_id, 1, wrong=set(train_rows[:2]) | {judge[0]})
    one = _iteration(st, job_id, 1)
    assert one["included"] is True
    assert one["selection_reason"].startswith("kept: within the noise of iteration 0")
    # Exactly the same predictions again: a tie keeps the data as well.
    _post(st, job_id, 2, wrong=set(train_rows[:2]) | {judge[0]})
    two = _iteration(st, job_id, 2)
    assert two["included"] is True
    assert two["selection_reason"].startswith("kept: within the noise of iteration 1")
    assert st.job(job_id)["best_iteration"] == 2
    manifest = _export(st, job_id)["manifest"]
    assert manifest["holds"].startswith("the seed rows and the examples of iteration(s) 1, 2")

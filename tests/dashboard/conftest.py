"""Helpers of the dashboard tests: a job spec on the fake teacher, signing in over HTTP."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def job_spec(train_id: str, validation_id: str, teacher_url: str, **changes: Any) -> dict[str, Any]:
    """A small classification job on TREC rows and the fake teacher (TF-IDF student)."""
    return {
        "name": "trec-dashboard",
        "strategy": "pgkd",
        "task": {
            "kind": "classification",
            "instructions": "Classify the question by the type of its answer.",
        },
        "datasets": {"train": train_id, "validation": validation_id},
        "teacher": {
            "base_url": teacher_url,
            "model": "fake-teacher",
            "prices": {"input_per_million": 1.0, "output_per_million": 2.0},
        },
        "student": {"type": "builtin", "model": "tfidf"},
        "budget": {"max_iterations": 3},
        "stopping": {"patience": 3},
        "batch_size": 4,
        "seed": 7,
        **changes,
    }


def form_token(html: str) -> str:
    match = CSRF_INPUT.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def sign_in(client: TestClient, key: str) -> str:
    """Sign the client in through the sign-in form; returns the session's CSRF token."""
    client.cookies.clear()
    page = client.get("/sign-in")
    assert page.status_code == 200
    resp = client.post(
        "/sign-in",
        data={"api_key": key, "csrf_token": form_token(page.text), "next": "/"},
        follow_redirects=False,
    )
    assert resp.status_code == 303, resp.text
    jobs = client.get("/")
    assert jobs.status_code == 200
    return form_token(jobs.text)

"""Webhooks: events stored as deliveries, signed, retried with backoff from the database, and
verified with the recipe docs/ci.md gives (examples/ci)."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import select

from service.domain.statuses import DeliveryStatus, JobStatus
from service.jobs import transition_job
from service.models import Job, WebhookDelivery, WebhookSubscription, utcnow
from service.secrets import encrypt_secret
from service.settings import get_settings
from service.webhooks import record_event, sign
from tests.conftest import REPO
from tests.integration.conftest import InlineStack
from workers.steps.webhooks import deliver_due

SHELL_RECIPE = REPO / "examples" / "ci" / "verify-webhook.sh"


def _recipe() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "verify_webhook", REPO / "examples" / "ci" / "verify_webhook.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shell_verify(tmp: Path, secret: str, timestamp: str, signature: str, body: bytes) -> bool:
    path = tmp / f"body-{uuid.uuid4().hex}"
    path.write_bytes(body)
    result = subprocess.run(
        ["sh", str(SHELL_RECIPE), secret, timestamp, signature, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0 and result.stdout.strip() == "ok"


def test_signatures_verify_with_the_documented_recipes(tmp_path: Path) -> None:
    recipe = _recipe()
    secret = "whsec_" + "s3cret" * 4
    body = json.dumps({"type": "job.completed", "data": {"job": {"id": "x"}}}).encode()
    now = int(time.time())
    signature = sign(secret, now, body)
    assert recipe.verify(secret, str(now), signature, body)
    assert _shell_verify(tmp_path, secret, str(now), signature, body)

    tampered = body.replace(b"completed", b"failed")
    assert not recipe.verify(secret, str(now), signature, tampered)
    assert not _shell_verify(tmp_path, secret, str(now), signature, tampered)
    assert not recipe.verify("whsec_other-secret-0000", str(now), signature, body)

    old = now - recipe.REPLAY_WINDOW_S - 5  # a captured request replayed later
    old_signature = sign(secret, old, body)
    assert not recipe.verify(secret, str(old), old_signature, body)
    assert not _shell_verify(tmp_path, secret, str(old), old_signature, body)
    assert recipe.verify(secret, str(old), old_signature, body, now=old + 10)


class Receiver:
    """An HTTP endpoint on loopback that records what it is sent; it can be down."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status = 204
        self._server: HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.received.append((dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.stop()


def _subscribe(st: InlineStack, url: str, events: list[str], **extra: Any) -> dict[str, Any]:
    resp = st.client.post(
        "/v1/webhooks", json={"url": url, "events": events, **extra}, headers=st.auth
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


@pytest.fixture
def hooks(inline_stack: InlineStack) -> InlineStack:
    inline_stack.client.app.state.settings.api.allow_private_webhook_urls = True  # type: ignore[attr-defined]
    return inline_stack


def _deliver(st: InlineStack, at: Any = None) -> int:
    with st.sessions() as session:
        return deliver_due(session, now=at)


def test_a_receiver_that_is_down_gets_the_events_later(
    hooks: InlineStack, receiver: Receiver, tmp_path: Path
) -> None:
    st = hooks
    all_events = _subscribe(
        st, receiver.url, ["iteration.completed", "job.completed", "job.failed"]
    )
    assert all_events["secret"].startswith("whsec_")
    job_id = st.create_job(st.job_spec())
    other = st.create_job(st.job_spec(name="other"))
    only_other = _subscribe(st, receiver.url, ["job.completed"], job_id=other)
    st.client.post(f"/v1/jobs/{other}/cancel", headers=st.auth)
    st.sender.run_until_idle()  # the receiver is down the whole time: the loop does not care
    assert st.job(job_id)["status"] == "succeeded"

    log = st.client.get(f"/v1/webhooks/{all_events['id']}/deliveries", headers=st.auth).json()
    events = sorted(d["event"] for d in log["items"])
    assert events == ["iteration.completed", "iteration.completed", "job.completed"]
    assert all(d["status"] == "pending" and d["attempts"] == 0 for d in log["items"])
    none = st.client.get(f"/v1/webhooks/{only_other['id']}/deliveries", headers=st.auth).json()
    assert none["items"] == []  # the other job was cancelled, not completed

    assert _deliver(st) == 3  # first attempt: connection refused
    log = st.client.get(f"/v1/webhooks/{all_events['id']}/deliveries", headers=st.auth).json()
    for d in log["items"]:
        assert d["status"] == "pending" and d["attempts"] == 1
        assert "Connect" in d["last_error"] or "refused" in d["last_error"]
        assert d["next_attempt_at"] is not None
    assert _deliver(st) == 0  # not due yet: the backoff is in the rows

    receiver.start()
    assert _deliver(st, at=utcnow() + timedelta(hours=1)) == 3
    log = st.client.get(f"/v1/webhooks/{all_events['id']}/deliveries", headers=st.auth).json()
    assert all(d["status"] == "succeeded" and d["attempts"] == 2 for d in log["items"])
    assert all(d["response_status"] == 204 for d in log["items"])

    recipe = _recipe()
    ids = set()
    for headers, body in receiver.received:
        assert recipe.verify(
            all_events["secret"],
            headers["X-Distill-Timestamp"],
            headers["X-Distill-Signature"],
            body,
        )
        assert _shell_verify(
            tmp_path,
            all_events["secret"],
            headers["X-Distill-Timestamp"],
            headers["X-Distill-Signature"],
            body,
        )
        payload = json.loads(body)
        assert payload["type"] == headers["X-Distill-Event"]
        assert payload["id"] == headers["X-Distill-Delivery"]
        assert payload["data"]["job"]["id"] == job_id
        ids.add(payload["id"])
    assert len(ids) == 3
    completed = [json.loads(b) for _, b in receiver.received]
    iteration_events = [p for p in completed if p["type"] == "iteration.completed"]
    assert sorted(p["data"]["iteration"]["number"] for p in iteration_events) == [0, 1]
    assert all(p["data"]["iteration"]["metric"] is not None for p in iteration_events)


def test_failing_receivers_are_retried_then_given_up(
    hooks: InlineStack, receiver: Receiver
) -> None:
    st = hooks
    receiver.status = 503
    receiver.start()
    hook = _subscribe(st, receiver.url, ["job.failed"])
    job_id = st.create_job(st.job_spec())
    with st.sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        transition_job(session, job, JobStatus.failed, reason="teacher refused")
        # The same event again (a redelivered step) is not a second delivery.
        assert job.finished_at is not None
        record_event(
            session, job, "job.failed", f"job.failed:{job.id}:{job.finished_at.isoformat()}", {}
        )
        session.commit()
        assert len(session.scalars(select(WebhookDelivery)).all()) == 1
    at = utcnow()
    max_attempts = get_settings().webhooks.max_attempts
    for attempt in range(1, max_attempts + 1):
        at += timedelta(hours=2)
        assert _deliver(st, at=at) == 1, attempt
    assert _deliver(st, at=at + timedelta(days=1)) == 0
    log = st.client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=st.auth).json()
    (delivery,) = log["items"]
    assert delivery["status"] == "failed" and delivery["attempts"] == max_attempts
    assert delivery["response_status"] == 503 and delivery["last_error"].startswith("HTTP 503")
    assert delivery["payload"]["data"]["job"]["status"] == "failed"
    assert delivery["payload"]["data"]["job"]["status_reason"] == "teacher refused"
    failed = st.client.get(
        f"/v1/webhooks/{hook['id']}/deliveries", params={"status": "failed"}, headers=st.auth
    )
    assert len(failed.json()["items"]) == 1


def test_webhook_urls_follow_the_teachers_address_rules(
    inline_stack: InlineStack, receiver: Receiver
) -> None:
    st = inline_stack
    refused = st.client.post(
        "/v1/webhooks", json={"url": receiver.url, "events": ["job.completed"]}, headers=st.auth
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "private_address"
    assert refused.json()["error"]["details"][0]["field"] == "url"
    for body in (
        {"url": "ftp://example.com/x", "events": ["job.completed"]},
        {"url": "https://example.com/x", "events": ["job.exploded"]},
        {"url": "https://example.com/x", "events": []},
        {"url": "https://example.com/x", "events": ["job.completed"], "job_id": str(uuid.uuid4())},
    ):
        assert st.client.post("/v1/webhooks", json=body, headers=st.auth).status_code == 422

    # At connect time too: a row that says "public only" is never sent to a private address.
    receiver.start()
    job_id = st.create_job(st.job_spec())
    with st.sessions() as session:
        job = session.get(Job, uuid.UUID(job_id))
        assert job is not None
        sub = WebhookSubscription(
            tenant_id=job.tenant_id,
            url=receiver.url,
            events=["job.completed"],
            secret_encrypted=encrypt_secret("whsec_0123456789abcdef"),
            allow_private_network=False,
        )
        session.add(sub)
        session.flush()
        record_event(session, job, "job.completed", "job.completed:test", {})
        session.commit()
        assert deliver_due(session) == 1
        delivery = session.scalar(
            select(WebhookDelivery).where(WebhookDelivery.subscription_id == sub.id)
        )
        assert delivery is not None
        assert delivery.status is DeliveryStatus.failed and "private" in (delivery.last_error or "")
    assert receiver.received == []


def test_subscriptions_are_listed_read_and_deleted_per_tenant(
    hooks: InlineStack, receiver: Receiver
) -> None:
    st = hooks
    hook = _subscribe(st, receiver.url, ["job.completed"], description="ci", secret="x" * 20)
    assert hook["secret"] == "x" * 20
    listed = st.client.get("/v1/webhooks", headers=st.auth).json()
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    assert (
        st.client.get(f"/v1/webhooks/{hook['id']}", headers=st.auth).json()["url"] == receiver.url
    )
    with st.sessions() as session:
        from service.auth import create_api_key, get_or_create_tenant

        _, other_key = create_api_key(session, get_or_create_tenant(session, "someone-else"))
        session.commit()
    other = {"Authorization": f"Bearer {other_key}"}
    assert st.client.get(f"/v1/webhooks/{hook['id']}", headers=other).status_code == 404
    assert st.client.get("/v1/webhooks", headers=other).json() == []
    assert st.client.delete(f"/v1/webhooks/{hook['id']}", headers=st.auth).status_code == 204
    assert st.client.get(f"/v1/webhooks/{hook['id']}", headers=st.auth).status_code == 404

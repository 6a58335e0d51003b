"""The dashboard over plain HTTP: sign-in and sessions, CSRF, tenant isolation, every page, and
what the pages show of a job run for real (Postgres, the embedded executor, the fake teacher)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.api.app import create_app
from service.auth import create_api_key, get_or_create_tenant
from service.cli import upgrade_database
from service.dashboard.sessions import SESSION_COOKIE
from service.db import make_engine, session_factory
from service.models import ApiKey, Example, Iteration, TeacherCall, Tenant, utcnow
from service.settings import ApiSettings, BrokerSettings, DatabaseSettings, Settings, get_settings
from tests.conftest import fresh_database
from tests.dashboard.conftest import form_token, job_spec, sign_in
from tests.data_factory import question_slice
from tests.fake_teacher.client import FakeTeacherProcess
from workers import runtime
from workers.inline import InlineTaskSender


@dataclass
class Dash:
    client: TestClient
    sessions: sessionmaker[Session]
    sender: InlineTaskSender
    key_a: str
    key_b: str
    job: str  # a finished LLM2LLM job of tenant a
    teacher_url: str

    def rest(self, method: str, path: str, key: str | None = None, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {key or self.key_a}"}
        return self.client.request(method, path, headers=headers, **kw)


def _upload(client: TestClient, key: str, data: bytes) -> str:
    resp = client.post(
        "/v1/datasets",
        content=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code in (200, 201), resp.text  # 200: the same upload again
    return str(resp.json()["id"])


def create_job(d: Dash, **changes: Any) -> str:
    train, val = question_slice(per_class=5, val_per_class=5)
    spec = job_spec(
        _upload(d.client, d.key_a, train), _upload(d.client, d.key_a, val), d.teacher_url, **changes
    )
    resp = d.rest("POST", "/v1/jobs", json=spec)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    home = tmp_path_factory.mktemp("dashboard-http-home")
    with (
        pytest.MonkeyPatch.context() as mp,
        fresh_database("distill_dashboard") as url,
        FakeTeacherProcess() as teacher,
    ):
        # Exports are written by the embedded executor under DISTILL_HOME.
        mp.setenv("DISTILL_HOME", str(home))
        get_settings.cache_clear()
        upgrade_database(url, quiet=True)
        engine = make_engine(url)
        sessions = session_factory(engine)
        sender = InlineTaskSender()
        runtime.configure(sessions=sessions, sender=sender)
        settings = Settings(
            database=DatabaseSettings(url=url),
            broker=BrokerSettings(url=None),
            api=ApiSettings(allow_private_teacher_urls=True),
            secret_key="dashboard-http-test-secret",
            home=home,
        )
        app = create_app(settings, sessions=sessions, task_sender=sender)
        with sessions() as s:
            _, key_a = create_api_key(s, get_or_create_tenant(s, "team-a"))
            _, key_b = create_api_key(s, get_or_create_tenant(s, "team-b"))
            s.commit()
        try:
            with TestClient(app) as client:
                d = Dash(client, sessions, sender, key_a, key_b, "", teacher.base_url)
                d.job = create_job(d, name="llm2llm-job", strategy="llm2llm")
                sender.run_until_idle()
                assert d.rest("GET", f"/v1/jobs/{d.job}").json()["status"] == "succeeded"
                yield d
        finally:
            runtime.reset()
            engine.dispose()
            get_settings.cache_clear()


@pytest.fixture
def client(dash: Dash) -> Iterator[TestClient]:
    dash.client.cookies.clear()
    yield dash.client
    dash.client.cookies.clear()


# --- sign-in and sessions ---------------------------------------------------------------------


def test_every_page_without_a_session_redirects_to_sign_in(dash: Dash, client: TestClient) -> None:
    example = _an_example(dash)
    for path in (
        "/",
        "/jobs",
        f"/jobs/{dash.job}",
        f"/jobs/{dash.job}/examples",
        f"/jobs/{dash.job}/examples/{example.id}",
        f"/jobs/{dash.job}/live",
        f"/jobs/{dash.job}/delete",
        "/jobs/rows",
    ):
        resp = client.get(path, follow_redirects=False)
        assert resp.status_code == 303, path
        assert resp.headers["location"].startswith("/sign-in?next=" + path.replace("/", "%2F"))
    # A live fragment of a page whose session ended takes the whole page to sign-in.
    live = client.get(f"/jobs/{dash.job}/live", headers={"HX-Request": "true"})
    assert live.status_code == 200 and live.headers["HX-Redirect"].startswith("/sign-in")
    # Actions too: nothing happens without a session.
    resp = client.post(f"/jobs/{dash.job}/cancel", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/sign-in")


def test_sign_in_sets_an_http_only_lax_cookie_and_returns_to_the_page_asked_for(
    dash: Dash, client: TestClient
) -> None:
    page = client.get("/sign-in", params={"next": f"/jobs/{dash.job}"})
    assert page.status_code == 200
    assert 'name="next" value="/jobs/' in page.text
    resp = client.post(
        "/sign-in",
        data={
            "api_key": dash.key_a,
            "csrf_token": form_token(page.text),
            "next": f"/jobs/{dash.job}",
        },
        follow_redirects=False,
    )
    assert resp.status_code == 303 and resp.headers["location"] == f"/jobs/{dash.job}"
    cookie = next(
        c for c in resp.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}=")
    )
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "max-age", "samesite"} <= attributes
    assert "samesite=lax" in cookie.lower()
    assert "secure" not in attributes  # plain http here; https below
    assert dash.key_a not in cookie  # the cookie never holds the key
    assert client.get(f"/jobs/{dash.job}").status_code == 200


def test_the_cookie_is_secure_over_https(dash: Dash) -> None:
    with TestClient(dash.client.app, base_url="https://dash.example") as https:
        page = https.get("/sign-in")
        assert "secure" in page.headers["set-cookie"].lower()
        resp = https.post(
            "/sign-in",
            data={"api_key": dash.key_a, "csrf_token": form_token(page.text), "next": "/"},
            follow_redirects=False,
        )
        cookie = next(
            c for c in resp.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}=")
        )
        assert "; secure" in cookie.lower()


def test_a_wrong_key_is_refused_and_sets_no_session(dash: Dash, client: TestClient) -> None:
    page = client.get("/sign-in")
    for key in ("dst_wrong", ""):
        resp = client.post(
            "/sign-in",
            data={"api_key": key, "csrf_token": form_token(page.text), "next": "/"},
            follow_redirects=False,
        )
        assert resp.status_code == 401
        assert 'role="alert"' in resp.text
        assert SESSION_COOKIE not in resp.headers.get("set-cookie", "")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_a_job_scoped_ci_key_cannot_sign_in(dash: Dash, client: TestClient) -> None:
    with dash.sessions() as s:
        tenant = s.scalar(select(Tenant).where(Tenant.name == "team-a"))
        assert tenant is not None
        _, scoped = create_api_key(s, tenant, "ci", job_id=uuid.UUID(dash.job))
        s.commit()
    page = client.get("/sign-in")
    resp = client.post(
        "/sign-in",
        data={"api_key": scoped, "csrf_token": form_token(page.text), "next": "/"},
        follow_redirects=False,
    )
    assert resp.status_code == 401
    assert "limited to one job" in resp.text
    assert SESSION_COOKIE not in resp.headers.get("set-cookie", "")


def test_the_sign_in_form_needs_its_own_token(dash: Dash, client: TestClient) -> None:
    form = {"api_key": dash.key_a, "next": "/"}
    # No sign-in cookie at all (a form posted from another site): refused.
    resp = client.post("/sign-in", data={**form, "csrf_token": "x"}, follow_redirects=False)
    assert resp.status_code == 403 and "csrf_token" in resp.text
    client.get("/sign-in")
    resp = client.post("/sign-in", data={**form, "csrf_token": "forged"}, follow_redirects=False)
    assert resp.status_code == 403
    assert SESSION_COOKIE not in resp.headers.get("set-cookie", "")


def test_next_never_leaves_the_site_and_why_is_never_echoed(dash: Dash, client: TestClient) -> None:
    assert "call 555" not in client.get("/sign-in", params={"why": "call 555"}).text
    assert "session expired" in client.get("/sign-in", params={"why": "expired"}).text
    page = client.get("/sign-in", params={"next": "//evil.example/x"})
    resp = client.post(
        "/sign-in",
        data={
            "api_key": dash.key_a,
            "csrf_token": form_token(page.text),
            "next": "https://evil.example",
        },
        follow_redirects=False,
    )
    assert resp.headers["location"] == "/"


def test_a_tampered_forged_or_expired_cookie_is_no_session(dash: Dash, client: TestClient) -> None:
    from itsdangerous import TimestampSigner, URLSafeTimedSerializer

    sign_in(client, dash.key_a)
    value = client.cookies[SESSION_COOKIE]
    salt = "distill.dashboard.session"
    payload = URLSafeTimedSerializer("dashboard-http-test-secret", salt=salt).loads(value)

    class TenHoursAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 10 * 3600

    for cookie in (
        value[:-2] + ("AA" if not value.endswith("AA") else "BB"),  # tampered
        URLSafeTimedSerializer("change-me", salt=salt).dumps(payload),  # another secret
        URLSafeTimedSerializer(  # older than api.session_max_age_s (8 h)
            "dashboard-http-test-secret", salt=salt, signer=TenHoursAgo
        ).dumps(payload),
    ):
        client.cookies.clear()
        client.cookies.set(SESSION_COOKIE, cookie)
        resp = client.get("/", follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"].startswith("/sign-in")
    client.cookies.clear()
    client.cookies.set(SESSION_COOKIE, value)
    assert client.get("/", follow_redirects=False).status_code == 200


def test_revoking_the_key_ends_its_sessions(dash: Dash, client: TestClient) -> None:
    with dash.sessions() as s:
        key_row, key = create_api_key(s, get_or_create_tenant(s, "team-a"), name="revoked")
        s.commit()
    sign_in(client, key)
    assert client.get("/").status_code == 200
    with dash.sessions() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_row.id).values(revoked_at=utcnow()))
        s.commit()
    resp = client.get("/", follow_redirects=False)
    assert resp.status_code == 303 and "revoked" in resp.headers["location"]


def test_sign_out_needs_the_token_then_ends_the_session(dash: Dash, client: TestClient) -> None:
    csrf = sign_in(client, dash.key_a)
    assert client.post("/sign-out", follow_redirects=False).status_code == 403
    assert client.get("/").status_code == 200  # still signed in
    resp = client.post("/sign-out", data={"csrf_token": csrf}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/sign-in?signed_out=true"
    assert f'{SESSION_COOKIE}=""' in resp.headers["set-cookie"]
    assert client.get(f"/jobs/{dash.job}", follow_redirects=False).status_code == 303


# --- pages --------------------------------------------------------------------------------------


def _an_example(d: Dash, **where: Any) -> Example:
    with d.sessions() as s:
        stmt = select(Example).where(Example.job_id == uuid.UUID(d.job)).order_by(Example.id)
        for key, value in where.items():
            stmt = stmt.where(getattr(Example, key) == value)
        example = s.scalars(stmt).first()
        assert example is not None
        return example


def test_every_page_answers_200(dash: Dash, client: TestClient) -> None:
    sign_in(client, dash.key_a)
    example = _an_example(dash)
    pages = [
        "/",
        "/jobs",
        "/?status=succeeded",
        "/?status=",
        f"/jobs/{dash.job}",
        f"/jobs/{dash.job}/examples",
        f"/jobs/{dash.job}/examples?iteration=1&kind=augmented&status=accepted&label=LOC&q=what",
        f"/jobs/{dash.job}/examples/{example.id}",
        f"/jobs/{dash.job}/delete",
        f"/jobs/{dash.job}/live",
        "/jobs/rows",
        "/sign-in",
    ]
    for path in pages:
        resp = client.get(path)
        assert resp.status_code == 200, (path, resp.text[:500])
        assert resp.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in resp.headers["content-security-policy"]
        assert resp.headers["cache-control"] == "no-store"
    for asset, kind in (("htmx.min.js", "javascript"), ("dashboard.css", "text/css")):
        resp = client.get(f"/static/dashboard/{asset}")
        assert resp.status_code == 200 and kind in resp.headers["content-type"]


class _Controls(HTMLParser):
    """The form controls of a page and the ids that a <label for> names."""

    def __init__(self) -> None:
        super().__init__()
        self.controls: list[dict[str, str | None]] = []
        self.labelled: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "label" and values.get("for"):
            self.labelled.add(str(values["for"]))
        if tag in ("select", "textarea") or (tag == "input" and values.get("type") != "hidden"):
            self.controls.append(values)


def test_every_form_control_has_a_label(dash: Dash, client: TestClient) -> None:
    sign_in(client, dash.key_a)
    for path in ("/", f"/jobs/{dash.job}", f"/jobs/{dash.job}/examples"):
        parser = _Controls()
        parser.feed(client.get(path).text)
        unlabelled = [c for c in parser.controls if c.get("id") not in parser.labelled]
        assert parser.controls, path
        assert unlabelled == [], (path, unlabelled)
    client.cookies.clear()
    parser = _Controls()
    parser.feed(client.get("/sign-in").text)
    assert [c.get("id") for c in parser.controls] == ["api-key"]
    assert parser.labelled == {"api-key"}


def test_examples_page_through_in_the_order_the_rest_api_gives(
    dash: Dash, client: TestClient
) -> None:
    sign_in(client, dash.key_a)
    everything = dash.rest("GET", f"/v1/jobs/{dash.job}/examples", params={"limit": 500}).json()[
        "items"
    ]
    assert len(everything) > 50, "the job wrote more than one page of examples"
    first = client.get(f"/jobs/{dash.job}/examples").text
    next_link = re.search(r'href="(/jobs/[^"]+/examples\?[^"]*cursor=[^"]+)">Next page', first)
    assert next_link is not None
    second = client.get(next_link.group(1).replace("&amp;", "&")).text
    shown = re.findall(r'<tr data-example-id="([^"]+)"', first) + re.findall(
        r'<tr data-example-id="([^"]+)"', second
    )
    assert shown == [e["id"] for e in everything][: len(shown)] and len(shown) > 50


def test_the_jobs_list_shows_each_job_and_filters_by_status(dash: Dash, client: TestClient) -> None:
    sign_in(client, dash.key_a)
    job = dash.rest("GET", f"/v1/jobs/{dash.job}").json()
    page = client.get("/").text
    row = re.search(rf'<tr data-job-id="{dash.job}">(.*?)</tr>', page, re.S)
    assert row is not None
    cells = row.group(1)
    assert 'data-status="succeeded"' in cells and "llm2llm" in cells and "fake-teacher" in cells
    assert f"{job['current_iteration']} / 3" in cells
    assert f"{job['examples_accepted']} " in cells
    assert dash.job not in client.get("/?status=running").text
    assert "No running jobs." in client.get("/?status=running").text
    assert dash.job in client.get("/?status=succeeded").text


def test_the_job_page_charts_one_point_per_iteration_with_the_best_marked(
    dash: Dash, client: TestClient
) -> None:
    sign_in(client, dash.key_a)
    job = dash.rest("GET", f"/v1/jobs/{dash.job}").json()
    iterations = dash.rest("GET", f"/v1/jobs/{dash.job}/iterations").json()
    html = client.get(f"/jobs/{dash.job}").text
    chart = re.search(r'<svg[^>]*data-chart="metric".*?</svg>', html, re.S)
    assert chart is not None
    points = re.findall(r'<g class="point[^"]*" data-iteration="(\d+)"', chart.group(0))
    assert points == [str(it["number"]) for it in iterations]
    best = re.findall(
        r'data-iteration="(\d+)"\s+data-value="[^"]*" data-best="true"', chart.group(0)
    )
    assert best == [str(job["best_iteration"])]
    # Accepted/rejected stacked per generated iteration, tokens per iteration, per-class F1.
    bars = re.findall(r'<g class="bar" data-iteration="(\d+)" data-total="(\d+)"', html)
    outcomes = bars[: len(iterations) - 1]
    assert [(int(n), int(t)) for n, t in outcomes] == [
        (it["number"], it["examples_accepted"] + it["examples_rejected"]) for it in iterations[1:]
    ]
    tokens = bars[len(iterations) - 1 :]
    assert [int(t) for _, t in tokens] == [
        it["tokens_in"] + it["tokens_out"] for it in iterations[1:]
    ]
    labels = job["spec"]["task"]["labels"]
    cells = re.findall(r'<g class="cell" data-class="([^"]+)" data-iteration="(\d+)"', html)
    assert len(cells) == len(labels) * len(iterations)
    assert "Most confused pairs" in html
    assert "Finished: the iteration budget was used up." in html
    assert "strategy: llm2llm" in html  # the job spec


def test_an_excluded_iteration_is_shown_as_such_with_its_reason(
    dash: Dash, client: TestClient
) -> None:
    """What record_metrics writes for an iteration whose data lowered the metric."""
    sign_in(client, dash.key_a)
    with dash.sessions() as s:
        it = s.scalar(
            select(Iteration).where(Iteration.job_id == uuid.UUID(dash.job), Iteration.number == 1)
        )
        assert it is not None
        reason = "excluded: measurably worse than iteration 0 — validation accuracy -9.0 pts"
        s.execute(
            update(Iteration)
            .where(Iteration.id == it.id)
            .values(included=False, regressed=True, selection_reason=reason)
        )
        s.commit()
    try:
        html = client.get(f"/jobs/{dash.job}").text
        assert re.search(
            r'data-iteration="1"\s+data-value="[^"]*" data-best="false" data-excluded="true"', html
        )
        row = re.search(r'<tr data-iteration="1">(.*?)</tr>', html, re.S)
        assert row is not None and "measurably worse than iteration 0" in row.group(1)
    finally:
        with dash.sessions() as s:
            s.execute(
                update(Iteration)
                .where(Iteration.job_id == uuid.UUID(dash.job), Iteration.number == 1)
                .values(included=True, regressed=False, selection_reason=None)
            )
            s.commit()


def test_sample_filters_match_the_rest_api(dash: Dash, client: TestClient) -> None:
    sign_in(client, dash.key_a)
    for params in (
        {"status": "accepted"},
        {"iteration": "2"},
        {"kind": "augmented", "label": "HUM"},
        {"q": "WHAT"},  # case-insensitive
        {"q": "100%"},  # % is a character, not a wildcard
        {"status": "accepted", "iteration": "1", "label": "LOC", "q": "the"},
    ):
        html = client.get(f"/jobs/{dash.job}/examples", params=params).text
        shown = re.findall(r'<tr data-example-id="([^"]+)"', html)
        expected = dash.rest(
            "GET", f"/v1/jobs/{dash.job}/examples", params={**params, "limit": 500}
        ).json()["items"]
        assert shown == [e["id"] for e in expected][:50], params
        count = re.search(r'data-testid="match-count">(\d+) example', html)
        assert count is not None and int(count.group(1)) == len(expected), params
        if "q" in params:
            needle = params["q"].lower()
            assert all(
                needle in (e["input"] + (e["output"] or "") + (e["rationale"] or "")).lower()
                for e in expected
            )
    assert dash.rest("GET", f"/v1/jobs/{dash.job}/examples", params={"q": "what"}).json()[
        "items"
    ], "the fake teacher's examples contain 'what'"


def test_the_lineage_shows_the_seed_row_the_wrong_prediction_prompt_and_call(
    dash: Dash, client: TestClient
) -> None:
    sign_in(client, dash.key_a)
    example = _an_example(dash, status="accepted", target_reason="wrong_seed")
    assert example.source_row_id is not None
    with dash.sessions() as s:
        call = s.get(TeacherCall, example.teacher_call_id)
        assert call is not None
        from service.models import DatasetRow, Prediction

        seed = s.get(DatasetRow, example.source_row_id)
        assert seed is not None
        iteration = s.get(Iteration, example.iteration_id)
        assert iteration is not None
        wrong = s.scalars(
            select(Prediction)
            .join(Iteration, Iteration.id == Prediction.iteration_id)
            .where(
                Prediction.row_id == seed.id,
                Iteration.number < iteration.number,
                Prediction.correct.is_(False),
            )
        ).all()
        assert wrong, "an LLM2LLM example answers a seed row the student got wrong"
    html = client.get(f"/jobs/{dash.job}/examples/{example.id}").text
    assert "the student got this seed row wrong (LLM2LLM)" in html
    source = re.search(r'data-testid="source-row">(.*?)</table>', html, re.S)
    assert source is not None and _escaped(seed.data["text"]) in source.group(1)
    answers = re.search(r'data-testid="student-answers">(.*?)</table>', html, re.S)
    assert answers is not None
    assert f"<strong>{_escaped(wrong[-1].predicted or '')}</strong>" in answers.group(1)
    prompt = re.search(r'data-testid="prompt-user">(.*?)</pre>', html, re.S)
    assert prompt is not None and _escaped(seed.data["text"])[:30] in prompt.group(1)
    facts = re.search(r'data-testid="teacher-call">(.*?)</dl>', html, re.S)
    assert facts is not None
    assert f"{call.tokens_in} in, {call.tokens_out} out" in facts.group(1)
    assert f"<dd>{call.attempts}" in facts.group(1)
    assert call.fingerprint == example.prompt_fingerprint and call.fingerprint in html


def _escaped(text: str) -> str:
    from markupsafe import escape

    return str(escape(text))


def test_bad_filter_values_are_a_422_naming_the_field(dash: Dash, client: TestClient) -> None:
    sign_in(client, dash.key_a)
    for path, params, field in (
        ("/", {"status": "nope"}, "status"),
        (f"/jobs/{dash.job}/examples", {"iteration": "abc"}, "iteration"),
        (f"/jobs/{dash.job}/examples", {"iteration": "-1"}, "iteration"),
        (f"/jobs/{dash.job}/examples", {"kind": "poem"}, "kind"),
        (f"/jobs/{dash.job}/examples", {"status": "maybe"}, "status"),
        (f"/jobs/{dash.job}/examples", {"q": "a\x00b"}, "q"),
        (f"/jobs/{dash.job}/examples", {"q": "x" * 201}, "q"),
        ("/", {"cursor": "not-a-cursor"}, "cursor"),
    ):
        resp = client.get(path, params=params)
        assert resp.status_code == 422, (path, params, resp.status_code)
        assert f"<code>{field}</code>" in resp.text, (path, params)
    assert client.get("/jobs/not-a-uuid").status_code == 422
    assert client.get(f"/jobs/{uuid.uuid4()}").status_code == 404


# --- live parts ---------------------------------------------------------------------------------


def test_live_parts_answer_204_until_something_changes(dash: Dash, client: TestClient) -> None:
    sign_in(client, dash.key_a)
    html = client.get(f"/jobs/{dash.job}").text
    # A finished job with no pending export does not poll at all.
    assert 'data-stopped="true"' in html and 'hx-trigger="every 2s"' not in html
    signature = _live_signature(client, dash.job)
    assert client.get(f"/jobs/{dash.job}/live", params={"seen": signature}).status_code == 204
    changed = client.get(f"/jobs/{dash.job}/live", params={"seen": "stale", "status": "running"})
    assert changed.status_code == 200
    for part in ("job-status", "job-progress", "job-iterations", "job-exports-list", "job-actions"):
        assert f'id="{part}"' in changed.text
    assert changed.text.count('hx-swap-oob="true"') == 5
    same_status = client.get(
        f"/jobs/{dash.job}/live", params={"seen": "stale", "status": "succeeded"}
    )
    assert 'id="job-actions"' not in same_status.text  # focus stays on the buttons

    rows = client.get("/jobs/rows")
    seen = re.search(r"seen=([0-9a-f]+)", rows.text)
    assert seen is not None
    assert client.get("/jobs/rows", params={"seen": seen.group(1)}).status_code == 204


def _live_signature(client: TestClient, job_id: str) -> str:
    html = client.get(f"/jobs/{job_id}/live", params={"seen": "x"}).text
    match = re.search(r'data-seen="([0-9a-f]+)"', html)
    assert match, "no signature in the live fragment"
    return match.group(1)


# --- actions ----------------------------------------------------------------------------------


def test_actions_need_the_csrf_token_and_go_through_the_job_states(
    dash: Dash, client: TestClient
) -> None:
    job = create_job(dash, name="to-control")  # queued: the executor is not draining now
    csrf = sign_in(client, dash.key_a)

    def status() -> str:
        return str(dash.rest("GET", f"/v1/jobs/{job}").json()["status"])

    for action in ("pause", "cancel", "delete", "exports"):
        for data in ({}, {"csrf_token": "forged"}):
            resp = client.post(f"/jobs/{job}/{action}", data=data, follow_redirects=False)
            assert resp.status_code == 403, (action, data)
            assert "csrf_token" in resp.text
    assert status() == "queued"
    assert dash.rest("GET", f"/v1/jobs/{job}/exports").json() == []

    resp = client.post(f"/jobs/{job}/pause", data={"csrf_token": csrf}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == f"/jobs/{job}"
    assert status() == "paused"
    assert 'data-status="paused"' in client.get(f"/jobs/{job}").text
    # htmx requests carry the token in a header instead of the form.
    resp = client.post(
        f"/jobs/{job}/resume", headers={"X-CSRF-Token": csrf}, follow_redirects=False
    )
    assert resp.status_code == 303 and status() == "queued"
    resp = client.post(f"/jobs/{job}/resume", data={"csrf_token": csrf})
    assert resp.status_code == 409 and "only a paused job can be resumed" in resp.text
    assert "cancel it first" in client.get(f"/jobs/{job}/delete").text
    assert client.post(f"/jobs/{job}/delete", data={"csrf_token": csrf}).status_code == 409
    client.post(f"/jobs/{job}/cancel", data={"csrf_token": csrf})
    assert status() == "cancelled"
    resp = client.post(f"/jobs/{job}/delete", data={"csrf_token": csrf}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/?deleted=true"
    assert dash.rest("GET", f"/v1/jobs/{job}").status_code == 404
    dash.sender.run_until_idle()  # the start message of the deleted job: a no-op


def test_export_from_the_dashboard_then_download_it(dash: Dash, client: TestClient) -> None:
    csrf = sign_in(client, dash.key_a)
    bad = client.post(f"/jobs/{dash.job}/exports", data={"csrf_token": csrf, "format": "dpo"})
    assert bad.status_code == 422 and "<code>format</code>" in bad.text
    resp = client.post(
        f"/jobs/{dash.job}/exports",
        data={"csrf_token": csrf, "format": "lineage"},
        follow_redirects=False,
    )
    assert resp.status_code == 303 and resp.headers["location"] == f"/jobs/{dash.job}#exports"
    [export] = [
        e
        for e in dash.rest("GET", f"/v1/jobs/{dash.job}/exports").json()
        if e["format"] == "lineage"
    ]
    pending = client.get(f"/jobs/{dash.job}/exports/{export['id']}/download")
    assert pending.status_code == 409
    page = client.get(f"/jobs/{dash.job}").text
    assert "being written" in page and 'hx-trigger="every 2s"' in page  # polls until written
    dash.sender.run_until_idle()
    page = client.get(f"/jobs/{dash.job}").text
    link = f"/jobs/{dash.job}/exports/{export['id']}/download"
    assert link in page
    download = client.get(link)
    assert download.status_code == 200
    done = dash.rest("GET", f"/v1/exports/{export['id']}").json()
    assert len(download.text.splitlines()) == done["row_count"] > 0
    assert {json.loads(line)["kind"] for line in download.text.splitlines()} >= {"seed"}


# --- tenants ------------------------------------------------------------------------------------


def test_another_tenant_sees_none_of_the_jobs_and_cannot_touch_them(
    dash: Dash, client: TestClient
) -> None:
    example = _an_example(dash)
    exports = dash.rest("GET", f"/v1/jobs/{dash.job}/exports").json()
    csrf = sign_in(client, dash.key_b)
    listing = client.get("/").text
    assert "data-job-id" not in listing and "No jobs yet." in listing
    assert 'data-testid="tenant">team-b<' in listing
    assert "data-job-id" not in client.get("/jobs/rows").text
    for path in (
        f"/jobs/{dash.job}",
        f"/jobs/{dash.job}/examples",
        f"/jobs/{dash.job}/examples/{example.id}",
        f"/jobs/{dash.job}/live",
        f"/jobs/{dash.job}/delete",
        *(f"/jobs/{dash.job}/exports/{e['id']}/download" for e in exports),
    ):
        resp = client.get(path)
        assert resp.status_code == 404, path
        assert "Not found" in resp.text
    for action in ("pause", "cancel", "delete", "exports"):
        resp = client.post(f"/jobs/{dash.job}/{action}", data={"csrf_token": csrf})
        assert resp.status_code == 404, action
    assert dash.rest("GET", f"/v1/jobs/{dash.job}").json()["status"] == "succeeded"

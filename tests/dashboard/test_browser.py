"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, against
`distill serve` in embedded mode (SQLite, steps in-process) and jobs run on the fake teacher.

Screenshots of each page are written under test-artifacts/dashboard/ (or
$DISTILL_TEST_ARTIFACTS/dashboard/); they are not compared, they are for people to look at.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO
from tests.dashboard.conftest import job_spec
from tests.data_factory import question_slice
from tests.e2e.conftest import DISTILL, wait_for
from tests.fake_teacher.client import FakeTeacherProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(os.environ.get("DISTILL_TEST_ARTIFACTS", REPO / "test-artifacts")) / "dashboard"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"needs {CHROMIUM} (Debian's chromium package; .ci/run installs it)",
    ),
]


@dataclass
class Served:
    base: str
    key_a: str
    key_b: str
    slow_teacher: str
    finished_job: str
    env: dict[str, str]

    def rest(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.base, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [DISTILL, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-1]


def _upload(http: httpx.Client, data: bytes, name: str) -> str:
    resp = http.post(
        "/v1/datasets",
        params={"name": name},
        content=data,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code in (200, 201), resp.text  # 200: the same upload again
    return str(resp.json()["id"])


def create_job(served: Served, teacher_url: str, **changes: Any) -> str:
    train, val = question_slice(per_class=5, val_per_class=5)
    with served.rest(served.key_a) as http:
        spec = job_spec(
            _upload(http, train, "trec-seed"),
            _upload(http, val, "trec-val"),
            teacher_url,
            **changes,
        )
        resp = http.post("/v1/jobs", json=spec)
        assert resp.status_code == 201, resp.text
        return str(resp.json()["id"])


def rest_job(served: Served, job_id: str) -> dict[str, Any]:
    with served.rest(served.key_a) as http:
        body: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").json()
        return body


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("dashboard-home")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL") and not k.startswith("DISTILL_")
    }
    env.update(
        DISTILL_HOME=str(home),
        DISTILL_API__ALLOW_PRIVATE_TEACHER_URLS="true",
        DISTILL_SECRET_KEY="dashboard-browser-test-secret",
        DISTILL_LOG_LEVEL="WARNING",
        HF_HUB_OFFLINE="1",
    )
    port = _free_port()
    with (
        FakeTeacherProcess() as fast,
        # One call at a time, a second each: a job that stays running while the test looks.
        FakeTeacherProcess(latency_ms=1000) as slow,
        (home / "serve.log").open("wb") as log,
    ):
        proc = subprocess.Popen(
            [DISTILL, "serve", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_for(up, 60, "distill serve to answer")
            served = Served(
                base=base,
                key_a=_cli(env, "keys", "create", "--tenant", "team-a"),
                key_b=_cli(env, "keys", "create", "--tenant", "team-b"),
                slow_teacher=slow.base_url,
                finished_job="",
                env=env,
            )
            served.finished_job = create_job(served, fast.base_url)
            job = wait_for(
                lambda: (
                    (j := rest_job(served, served.finished_job))["status"]
                    in ("succeeded", "failed", "cancelled")
                    and j
                ),
                180,
                "the job on the fake teacher to finish",
            )
            assert job["status"] == "succeeded", job
            yield served
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page: Any, name: str, *, first_screen: bool = False) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if first_screen:  # what a 1280x800 screen shows (the README's picture)
        page.screenshot(path=str(ARTIFACTS / f"{name}-1280x800.png"))


def sign_in(page: Any, served: Served, key: str) -> None:
    page.goto(served.base + "/")
    assert "/sign-in" in page.url  # no session: the sign-in page, whatever was asked for
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(served.base + "/")


def test_a_user_watches_and_controls_jobs_in_the_browser(
    served: Served, browser: Any, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    refused: list[str] = []  # what the Content-Security-Policy blocked, if anything
    page.on(
        "console",
        lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.goto(served.base + f"/jobs/{served.finished_job}")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "01-sign-in")
    page.get_by_label("API key").fill("dst_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    page.get_by_label("API key").fill(served.key_a)
    page.keyboard.press("Enter")  # the form works from the keyboard alone
    # Back to the page that was asked for before signing in.
    page.wait_for_url(served.base + f"/jobs/{served.finished_job}")

    # The jobs list: the finished job with its numbers.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    row = page.locator(f'tr[data-job-id="{served.finished_job}"]')
    expect(row.locator("[data-status]")).to_have_text("succeeded")
    expect(row).to_contain_text("pgkd")
    expect(row).to_contain_text("fake-teacher")
    shot(page, "02-jobs")

    # The job page: one chart point per iteration, the best one marked.
    row.get_by_role("link").click()
    job = rest_job(served, served.finished_job)
    with served.rest(served.key_a) as http:
        iterations = http.get(f"/v1/jobs/{served.finished_job}/iterations").json()
    points = page.locator('svg[data-chart="metric"] g.point')
    expect(points).to_have_count(len(iterations))
    assert [points.nth(i).get_attribute("data-iteration") for i in range(len(iterations))] == [
        str(it["number"]) for it in iterations
    ]
    best = page.locator('svg[data-chart="metric"] g.point[data-best="true"]')
    expect(best).to_have_count(1)
    assert best.get_attribute("data-iteration") == str(job["best_iteration"])
    expect(page.locator('svg[data-chart="outcomes"] g.bar')).to_have_count(len(iterations) - 1)
    expect(page.locator('svg[data-chart="heatmap"]')).to_be_visible()
    expect(page.get_by_test_id("status-sentence")).to_contain_text("Finished")
    shot(page, "03-job", first_screen=True)

    # The sample browser: filters narrow the examples exactly as the REST API does.
    page.get_by_role("link", name="Browse the examples and their lineage").click()
    label = "LOC"
    page.get_by_label("Status").select_option("accepted")
    page.get_by_label("Label").select_option(label)
    page.get_by_label("Text").fill("what")
    page.get_by_role("button", name="Apply filters").click()
    with served.rest(served.key_a) as http:
        expected = http.get(
            f"/v1/jobs/{served.finished_job}/examples",
            params={"status": "accepted", "label": label, "q": "what", "limit": 500},
        ).json()["items"]
    assert expected, "the fake teacher wrote no accepted LOC example containing 'what'"
    rows = page.locator("table.examples tbody tr")
    expect(rows).to_have_count(min(len(expected), 50))
    expect(page.get_by_test_id("match-count")).to_contain_text(f"{len(expected)} example")
    for i in range(rows.count()):
        expect(rows.nth(i)).to_contain_text(label)
        expect(rows.nth(i).locator("[data-status]")).to_have_text("accepted")
    shot(page, "04-examples")

    # An example's lineage: why it was asked for, the prompt, the teacher call.
    first = expected[0]
    page.locator(f'tr[data-example-id="{first["id"]}"]').get_by_role("link").click()
    lineage = page.get_by_test_id("lineage")
    expect(lineage).to_contain_text(first["input"][:40])
    expect(page.get_by_test_id("target-reason")).to_contain_text("PGKD")
    expect(page.get_by_test_id("prompt-user")).to_contain_text(label)
    expect(page.get_by_test_id("teacher-call")).to_contain_text("Tokens")
    shot(page, "05-lineage")
    page.get_by_role("link", name="← Back to the examples").click()
    expect(page.get_by_label("Label")).to_have_value(label)  # the filters survive the way back

    # Export from the job page: the file appears live, then downloads.
    page.goto(served.base + f"/jobs/{served.finished_job}")
    page.get_by_label("Format").select_option("lineage")
    page.get_by_role("button", name="Export the dataset").click()
    download_link = page.locator("#job-exports-list").get_by_role("link", name="Download")
    expect(download_link).to_be_visible(timeout=30_000)
    with page.expect_download() as info:
        download_link.click()
    saved = tmp_path / "export.jsonl"
    info.value.save_as(saved)
    lines = [json.loads(line) for line in saved.read_text().splitlines()]
    assert lines and {row["kind"] for row in lines} >= {"seed"}

    # A running job: its live progress, then cancelled from its page, and the jobs list open
    # in another tab follows without being reloaded.
    running = create_job(
        served,
        served.slow_teacher,
        name="slow-teacher",
        budget={"max_iterations": 5},
        batch_size=1,
    )
    listing = context.new_page()
    listing.set_viewport_size({"width": 1280, "height": 800})
    listing.goto(served.base + "/")
    listing.evaluate("window.notReloaded = true")
    running_row = listing.locator(f'tr[data-job-id="{running}"]')
    expect(running_row.locator("[data-status]")).to_have_text("running", timeout=30_000)

    page.goto(served.base + f"/jobs/{running}")
    expect(page.get_by_role("heading", name="Iteration 1 under way")).to_be_visible(timeout=30_000)
    expect(page.get_by_test_id("phase")).to_have_text("generating")
    shot(page, "06-running-job")
    page.get_by_role("button", name="Cancel job").focus()
    page.keyboard.press("Enter")  # keyboard alone
    expect(page.locator("#job-status [data-status]")).to_have_text("cancelled")
    expect(running_row.locator("[data-status]")).to_have_text("cancelled", timeout=15_000)
    assert listing.evaluate("window.notReloaded") is True
    assert rest_job(served, running)["status"] == "cancelled"
    shot(listing, "07-jobs-live")
    listing.close()

    # Delete the cancelled job, after a confirmation page.
    page.get_by_role("link", name="Delete job…").click()
    page.get_by_role("button", name="Delete the job").click()
    page.wait_for_url(served.base + "/?deleted=true")
    expect(page.locator(f'tr[data-job-id="{running}"]')).to_have_count(0)
    with served.rest(served.key_a) as http:
        assert http.get(f"/v1/jobs/{running}").status_code == 404

    # Sign out, then be refused.
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("status")).to_contain_text("signed out")
    page.goto(served.base + f"/jobs/{served.finished_job}")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    assert "/sign-in" in page.url
    assert refused == []
    context.close()


def test_a_second_tenant_sees_none_of_the_first_tenants_jobs(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    sign_in(page, served, served.key_b)
    expect(page.get_by_test_id("tenant")).to_have_text("team-b")
    expect(page.locator("tr[data-job-id]")).to_have_count(0)
    expect(page.get_by_text("No jobs yet.")).to_be_visible()
    shot(page, "08-other-tenant-jobs")
    for path in ("", "/examples", "/live"):
        response = page.goto(served.base + f"/jobs/{served.finished_job}{path}")
        assert response is not None and response.status == 404
    expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    shot(page, "09-other-tenant-404")
    context.close()

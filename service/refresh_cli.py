"""`distill refresh`: the CI step. Ask a (remote) server for a refresh, wait, gate, export.

A plain HTTP client of the REST API (it needs no database, and no worker code): the key comes
from an environment variable, progress goes to stderr, the summary to stdout (text, or one
JSON object with --json), and the exit code says what happened — see `EXIT_CODES`.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 3
EXIT_GATE_FAILED = 4
EXIT_UNAVAILABLE = 5
EXIT_CODES = {
    EXIT_OK: "the refresh is done (and every quality gate passed)",
    EXIT_JOB_FAILED: "the job failed or was cancelled, or its export could not be written",
    EXIT_USAGE: "usage error: a bad option, no or a refused API key, an unknown job, or a "
    "refresh the server refused (the message says why)",
    EXIT_TIMEOUT: "--timeout passed before the refresh was done",
    EXIT_GATE_FAILED: "a quality gate failed (--fail-if-metric-below, --fail-if-worse)",
    EXIT_UNAVAILABLE: "the server could not be reached, or kept failing (5xx)",
}
RESULTS = {
    EXIT_OK: "ok",
    EXIT_JOB_FAILED: "job_failed",
    EXIT_USAGE: "usage_error",
    EXIT_TIMEOUT: "timeout",
    EXIT_GATE_FAILED: "gate_failed",
    EXIT_UNAVAILABLE: "unavailable",
}
# Outcomes of GET /v1/jobs/{id}/refreshes/{id} (service/refreshes.py) that end the wait.
DONE = {"succeeded", "ready_for_student", "failed", "cancelled"}
# How long a call keeps retrying an unreachable or failing server before giving up.
UNAVAILABLE_GRACE_S = 60.0


class Stop(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Run:
    """What the command learned, for the summary."""

    job_id: str
    refresh: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    export: dict[str, Any] | None = None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Api:
    """The few calls the command makes; retries an unreachable or failing server (safe: the
    refresh carries an Idempotency-Key, the rest are reads or an export request)."""

    def __init__(self, url: str, key: str, deadline: float) -> None:
        self.deadline = deadline
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}", "User-Agent": "distill-refresh"},
            timeout=30.0,
        )

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        give_up = min(time.monotonic() + UNAVAILABLE_GRACE_S, self.deadline)
        delay = 1.0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
                if response.status_code < 500 and response.status_code != 429:
                    break
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            # httpx retries nothing but connection set-up; a 5xx or 429 from a restarting
            # server is worth a few more tries within the grace period.
            if time.monotonic() + delay > give_up:  # the grace period or --timeout ended
                raise Stop(EXIT_UNAVAILABLE, f"{self.http.base_url}: {problem}")
            _say(f"server unavailable ({problem}); retrying in {delay:.0f}s")
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        if response.status_code >= 400:
            raise Stop(EXIT_USAGE, _error_message(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body: dict[str, Any] = self.call(method, path, **kwargs).json()
        return body


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        message = f"HTTP {response.status_code} {error['code']}: {error['message']}"
        if error.get("details"):
            message += "\n" + json.dumps(error["details"], indent=2)
        return message
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:500]}"


def _progress(refresh: dict[str, Any]) -> str:
    parts = [
        f"refresh {str(refresh['id'])[:8]}: {refresh['outcome']} (job {refresh['job_status']})"
    ]
    for it in refresh.get("iterations") or []:
        line = f"iteration {it['number']} {it['status']}"
        if it["status"] in ("generating", "scoring") and it["batches_total"]:
            line += f" {it['batches_done']}/{it['batches_total']} batches"
        if it["examples_accepted"]:
            line += f", {it['examples_accepted']} accepted"
        if it["metric"] is not None:
            line += f", metric {it['metric']:.4f}"
        parts.append(line)
    return "; ".join(parts)


def _gates(
    refresh: dict[str, Any], metric_below: float | None, fail_if_worse: bool
) -> list[dict[str, Any]]:
    metric, baseline = refresh.get("metric"), refresh.get("baseline_metric")
    gates = []
    if metric_below is not None:
        passed = metric is not None and metric >= metric_below
        gates.append(
            {
                "gate": "metric_at_least",
                "threshold": metric_below,
                "metric": metric,
                "passed": passed,
            }
        )
    if fail_if_worse:
        # Nothing earlier to compare with (a first evaluation) is not a regression.
        passed = baseline is None or (metric is not None and metric >= baseline)
        gates.append(
            {"gate": "not_worse", "baseline": baseline, "metric": metric, "passed": passed}
        )
    return gates


def _export(api: Api, run: Run, fmt: str, out: Path, poll_s: float) -> None:
    body: dict[str, Any] = {"format": fmt}
    if run.refresh.get("dataset_iteration") is not None:
        body["iteration"] = run.refresh["dataset_iteration"]
    export = api.json("POST", f"/v1/jobs/{run.job_id}/exports", json=body)
    while export["status"] not in ("succeeded", "failed"):
        if time.monotonic() > api.deadline:
            raise Stop(EXIT_TIMEOUT, f"timed out waiting for export {export['id']}")
        time.sleep(poll_s)
        export = api.json("GET", f"/v1/exports/{export['id']}")
    if export["status"] == "failed":
        raise Stop(EXIT_JOB_FAILED, f"export {export['id']} failed: {export['error']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with api.http.stream("GET", f"/v1/exports/{export['id']}/download") as response:
        if response.status_code != 200:
            response.read()
            raise Stop(EXIT_USAGE, _error_message(response))
        with partial.open("wb") as fh:
            for chunk in response.iter_bytes():
                fh.write(chunk)
    partial.replace(out)  # a CI artifact is never half a file
    run.export = {
        "id": export["id"],
        "path": str(out),
        "rows": export["row_count"],
        "format": fmt,
        "iteration": export.get("iteration"),
        "manifest": export.get("manifest"),
    }


def _summary(run: Run, code: int, reason: str | None, as_json: bool) -> None:
    refresh = run.refresh
    if as_json:
        print(
            json.dumps(
                {
                    "exit_code": code,
                    "result": RESULTS[code],
                    "reason": reason,
                    "job_id": run.job_id,
                    "refresh_id": refresh.get("id"),
                    "outcome": refresh.get("outcome"),
                    "job_status": refresh.get("job_status"),
                    "student_iteration": refresh.get("student_iteration"),
                    "iteration": refresh.get("iteration"),
                    "metric": refresh.get("metric"),
                    "baseline_metric": refresh.get("baseline_metric"),
                    "best_iteration": refresh.get("best_iteration"),
                    "gates": run.gates,
                    "export": run.export,
                },
                indent=2,
            )
        )
        return
    if refresh:
        print(f"refresh {refresh['id']} of job {run.job_id}: {refresh['outcome']}")
        if refresh.get("student_iteration") is not None:
            metric = refresh.get("metric")
            baseline = refresh.get("baseline_metric")
            shown = "-" if metric is None else f"{metric:.4f}"
            before = "" if baseline is None else f" (best before: {baseline:.4f})"
            print(f"student (iteration {refresh['student_iteration']}): metric {shown}{before}")
        for it in refresh.get("iterations") or []:
            if refresh.get("iteration") is not None and it["number"] >= refresh["iteration"]:
                print(
                    f"iteration {it['number']}: {it['status']}, {it['examples_accepted']} "
                    f"accepted, {it['examples_rejected']} rejected"
                )
    for gate in run.gates:
        print(f"gate {gate['gate']}: {'passed' if gate['passed'] else 'FAILED'}")
    if run.export:
        print(f"export: {run.export['path']} ({run.export['rows']} rows)")
    if reason:
        _say(f"error {RESULTS[code]}: {reason}")  # the other commands' `error CODE: message`


def refresh_command(
    job_id: Annotated[uuid.UUID, typer.Argument(help="The job to refresh.")],
    url: Annotated[
        str, typer.Option(envvar="DISTILL_URL", help="The server's base URL.")
    ] = "http://127.0.0.1:8000",
    key_env: Annotated[
        str, typer.Option(help="Environment variable holding the API key (a job-scoped key).")
    ] = "DISTILL_API_KEY",
    wait: Annotated[bool, typer.Option(help="Wait until the refresh is done.")] = False,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds --wait waits at most.")] = 3600,
    poll_interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
    fail_if_metric_below: Annotated[
        float | None, typer.Option(help="Exit 4 when the refreshed student's metric is below.")
    ] = None,
    fail_if_worse: Annotated[
        bool, typer.Option(help="Exit 4 when it is below the best metric before it.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="The summary as one JSON object.")
    ] = False,
    export: Annotated[
        str | None, typer.Option(help="Download the dataset in this format (jsonl, chat, …).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where --export writes the file.")] = None,
    note: Annotated[
        str | None, typer.Option(help="Kept on the new iteration (commit SHA, run URL).")
    ] = None,
    student_model: Annotated[
        str | None, typer.Option(help="Endpoint student: the served model's new name.")
    ] = None,
    student_url: Annotated[
        str | None, typer.Option(help="Endpoint student: its new base URL.")
    ] = None,
    revision: Annotated[
        str | None, typer.Option(help="A label for the student revision (kept).")
    ] = None,
    iterations: Annotated[int, typer.Option(min=1, help="Iterations to add.")] = 1,
    extra_tokens: Annotated[int | None, typer.Option(min=1, help="Raise the token budget.")] = None,
    extra_cost: Annotated[float | None, typer.Option(min=0.0, help="Raise the USD budget.")] = None,
    extra_examples: Annotated[
        int | None, typer.Option(min=1, help="Raise the example budget.")
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            envvar="DISTILL_IDEMPOTENCY_KEY",
            help="Makes a re-run of the same CI step wait for the same refresh (e.g. the CI "
            "run id); default: a fresh one.",
        ),
    ] = None,
) -> None:
    """Start a refresh of JOB (the next iteration aimed at its latest student's errors) on a
    server, optionally wait, gate on the student's metric, and download the new dataset.

    Exit codes: 0 done (gates passed); 1 job failed or cancelled (or its export failed);
    2 usage error or a request the server refused; 3 timeout; 4 a quality gate failed;
    5 the server was unreachable or kept failing."""
    if (fail_if_metric_below is not None or fail_if_worse or export) and not wait:
        _usage("--fail-if-metric-below, --fail-if-worse and --export need --wait")
    if bool(export) != bool(out):
        _usage("--export FORMAT and --out PATH go together")
    key = os.environ.get(key_env, "").strip()
    if not key:
        _usage(
            f"no API key: set the environment variable {key_env} (or name another with --key-env)"
        )
    deadline = time.monotonic() + timeout
    run = Run(job_id=str(job_id))
    body: dict[str, Any] = {"extra_budget": {"iterations": iterations}}
    for name, value in (
        ("tokens", extra_tokens),
        ("cost_usd", extra_cost),
        ("examples", extra_examples),
    ):
        if value is not None:
            body["extra_budget"][name] = value
    student = {"model": student_model, "base_url": student_url, "revision": revision}
    if any(v is not None for v in student.values()):
        body["student"] = {k: v for k, v in student.items() if v is not None}
    if note is not None:
        body["note"] = note
    api = Api(url, key, deadline)
    code, reason = EXIT_OK, None
    try:
        run.refresh = api.json(
            "POST",
            f"/v1/jobs/{job_id}/refresh",
            json=body,
            headers={"Idempotency-Key": idempotency_key or f"cli-{uuid.uuid4()}"},
        )
        _say(_progress(run.refresh))
        if wait:
            code, reason = _wait_and_gate(
                api, run, poll_interval, fail_if_metric_below, fail_if_worse
            )
            if export and out and code in (EXIT_OK, EXIT_GATE_FAILED):
                _export(api, run, export, out, poll_interval)  # an artifact even when gated
    except Stop as stop:
        code, reason = stop.code, stop.message
    finally:
        api.close()
    _summary(run, code, reason, as_json)
    raise typer.Exit(code)


def _wait_and_gate(
    api: Api,
    run: Run,
    poll_s: float,
    metric_below: float | None,
    fail_if_worse: bool,
) -> tuple[int, str | None]:
    path = f"/v1/jobs/{run.job_id}/refreshes/{run.refresh['id']}"
    shown = _progress(run.refresh)
    while run.refresh["outcome"] not in DONE:
        if time.monotonic() + poll_s > api.deadline:
            raise Stop(EXIT_TIMEOUT, f"timed out: the refresh is still {run.refresh['outcome']}")
        time.sleep(poll_s)
        run.refresh = api.json("GET", path)
        line = _progress(run.refresh)
        if line != shown:
            _say(line)
            shown = line
    outcome = run.refresh["outcome"]
    if outcome in ("failed", "cancelled"):
        why = run.refresh.get("job_status_reason")
        return EXIT_JOB_FAILED, f"job {run.job_id} {outcome}" + (f": {why}" if why else "")
    run.gates = _gates(run.refresh, metric_below, fail_if_worse)
    failed = [g["gate"] for g in run.gates if not g["passed"]]
    if failed:
        return EXIT_GATE_FAILED, f"quality gate failed: {', '.join(failed)}"
    return EXIT_OK, None


def _usage(message: str) -> NoReturn:
    _say(f"error {RESULTS[EXIT_USAGE]}: {message}")
    raise typer.Exit(EXIT_USAGE)


def main(args: list[str]) -> None:
    """`distill refresh ARGS` on its own (workers/entry.py): the same command `distill --help`
    lists, without importing the rest of the CLI."""
    from service.cli_style import DistillTyper

    app = DistillTyper(help="The CI step.", add_completion=False)
    app.command("refresh")(refresh_command)
    typer.main.get_command(app).main(args=args, prog_name="distill refresh")

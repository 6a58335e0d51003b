"""The dashboard's pages: thin routes over the service functions the REST API uses."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates

from service.api.deps import SessionDep, SettingsDep
from service.api.schemas import PG_INT_MAX
from service.auth import authenticate, touch_key
from service.dashboard import formatting, views
from service.dashboard.sessions import (
    CSRF_FIELD,
    CSRF_HEADER,
    SIGN_IN_REASONS,
    DashboardSession,
    SignInRequired,
    check_csrf,
    check_sign_in_token,
    end_session,
    read_session,
    set_sign_in_cookie,
    sign_in_token,
    start_session,
)
from service.domain.spec import Text
from service.domain.statuses import JOB_TERMINAL, ExampleStatus, ExportStatus, JobStatus
from service.domain.strategies.base import ExampleKind
from service.errors import Conflict, DistillError, NotFound, Unauthorized, ValidationFailed
from service.examples import (
    ExampleFilters,
    count_examples,
    example_lineage,
    get_example,
    list_examples,
)
from service.exports import get_export, request_export
from service.jobs import delete_job, get_job, list_iterations, list_jobs, request_transition
from service.models import Job, Tenant

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
formatting.install(TEMPLATES.env)

# Scripts and styles only from this origin (htmx is vendored; no inline script or style), no
# framing, forms only back to this origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
JOBS_PER_PAGE = 50
EXAMPLES_PER_PAGE = 50


def _safe_next(target: str | None) -> str:
    """Only a path of this site (no scheme, no host, no `//`): never an open redirect."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status_code: int = 200,
    session: DashboardSession | None = None,
    tenant: str | None = None,
) -> HTMLResponse:
    response = TEMPLATES.TemplateResponse(
        request,
        template,
        {
            "csrf": session.csrf_token if session else None,
            "csrf_field": CSRF_FIELD,
            "tenant": tenant,
            **context,
        },
        status_code=status_code,
    )
    return response


def _error_page(request: Request, status: int, code: str, message: str, details: Any) -> Response:
    fields = details if isinstance(details, list) else []
    return render(
        request,
        "error.html",
        {"status": status, "code": code, "message": message, "fields": fields},
        status_code=status,
    )


class DashboardRoute(APIRoute):
    """Dashboard answers in HTML: no session → the sign-in page; a DistillError or a bad
    parameter → an error page with the same status code, code, message and field names that
    the REST API would give in its JSON error shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired as exc:
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                url = "/sign-in?" + urlencode({"next": target, "why": exc.reason})
                if request.headers.get("hx-request"):
                    # A live fragment of a page whose session ended: take the page to sign-in.
                    response = Response(status_code=200, headers={"HX-Redirect": url})
                else:
                    response = _redirect(url)
            except DistillError as exc:
                response = _error_page(request, exc.status_code, exc.code, exc.message, exc.details)
            except RequestValidationError as exc:
                fields = [
                    {
                        "field": ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0]),
                        "message": err["msg"],
                    }
                    for err in exc.errors()
                ]
                first = fields[0] if fields else {"field": "request", "message": "invalid"}
                response = _error_page(
                    request,
                    422,
                    "validation_failed",
                    f"{first['field']}: {first['message']}",
                    fields,
                )
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return route


router = APIRouter(route_class=DashboardRoute, include_in_schema=False)


# --- session -------------------------------------------------------------------------------


def current_session(request: Request, db: SessionDep, settings: SettingsDep) -> DashboardSession:
    return read_session(request, db, settings)


UserDep = Annotated[DashboardSession, Depends(current_session)]
CsrfForm = Annotated[str | None, Form(alias=CSRF_FIELD)]


def _csrf(request: Request, user: DashboardSession, submitted: str | None) -> None:
    check_csrf(user, submitted or request.headers.get(CSRF_HEADER))


def _tenant_name(db: SessionDep, user: DashboardSession) -> str | None:
    tenant = db.get(Tenant, user.principal.tenant_id)
    return tenant.name if tenant is not None else None


@router.get("/sign-in")
def sign_in_page(
    request: Request,
    next_: Annotated[str | None, Query(alias="next", max_length=2000)] = None,
    why: Annotated[str | None, Query(max_length=32)] = None,
    signed_out: bool = False,
) -> Response:
    token = sign_in_token(request)
    response = render(
        request,
        "sign_in.html",
        {
            "next": _safe_next(next_),
            "why": SIGN_IN_REASONS.get(why or ""),
            "signed_out": signed_out,
            "error": None,
            "sign_in_token": token,
        },
    )
    set_sign_in_cookie(response, request, token)
    return response


@router.post("/sign-in")
def sign_in(
    request: Request,
    db: SessionDep,
    settings: SettingsDep,
    api_key: Annotated[str, Form(max_length=500)] = "",
    csrf_token: CsrfForm = None,
    next_: Annotated[str, Form(alias="next", max_length=2000)] = "/",
) -> Response:
    check_sign_in_token(request, csrf_token)
    key = api_key.strip()
    try:
        principal = authenticate(db, f"Bearer {key}") if key else None
    except Unauthorized:
        principal = None
    scoped = principal is not None and principal.job_id is not None
    if principal is None or scoped:
        # A job-scoped key (a CI secret) reads and refreshes one job over the API; the
        # dashboard acts on every job of the tenant, so it takes tenant keys only.
        return render(
            request,
            "sign_in.html",
            {
                "next": _safe_next(next_),
                "why": None,
                "signed_out": False,
                "error": "That key is limited to one job (a CI key): sign in with a key of "
                "the whole tenant."
                if scoped
                else "That API key is not valid, or it was revoked."
                if key
                else "Enter an API key.",
                "sign_in_token": csrf_token,
            },
            status_code=401,
        )
    touch_key(db, principal)
    db.commit()
    response = _redirect(_safe_next(next_))
    start_session(response, request, settings, principal)
    return response


@router.post("/sign-out")
def sign_out(request: Request, user: UserDep, csrf_token: CsrfForm = None) -> Response:
    _csrf(request, user, csrf_token)
    response = _redirect("/sign-in?signed_out=true")
    end_session(response, request)
    return response


# --- jobs list -----------------------------------------------------------------------------


def _job_status(value: str | None) -> JobStatus | None:
    if not value:
        return None
    try:
        return JobStatus(value)
    except ValueError:
        raise ValidationFailed(
            f"status: {value[:40]!r} is not a job status",
            details=[{"field": "status", "message": f"one of {[s.value for s in JobStatus]}"}],
        ) from None


StatusParam = Annotated[str | None, Query(alias="status", max_length=32)]
CursorParam = Annotated[str | None, Query(max_length=200)]


def _jobs_context(
    db: SessionDep, user: DashboardSession, status: str | None, cursor: str | None
) -> dict[str, Any]:
    wanted = _job_status(status)
    jobs, next_cursor = list_jobs(
        db, user.principal.tenant_id, status=wanted, cursor=cursor, limit=JOBS_PER_PAGE
    )
    summaries = views.summarize_jobs(db, jobs)
    return {
        "summaries": summaries,
        "status": wanted.value if wanted else "",
        "statuses": [s.value for s in JobStatus],
        "cursor": cursor or "",
        "next_cursor": next_cursor,
        "signature": views.list_signature(summaries),
        "any_active": any(s.active for s in summaries),
    }


@router.get("/")
@router.get("/jobs")
def jobs_page(
    request: Request,
    db: SessionDep,
    user: UserDep,
    status: StatusParam = None,
    cursor: CursorParam = None,
    deleted: bool = False,
) -> Response:
    context = _jobs_context(db, user, status, cursor)
    return render(
        request,
        "jobs.html",
        {**context, "deleted": deleted},
        session=user,
        tenant=_tenant_name(db, user),
    )


@router.get("/jobs/rows")
def jobs_rows(
    request: Request,
    db: SessionDep,
    user: UserDep,
    status: StatusParam = None,
    cursor: CursorParam = None,
    seen: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """The live jobs list: 204 while nothing changed, else the list again."""
    context = _jobs_context(db, user, status, cursor)
    if seen == context["signature"]:
        return Response(status_code=204)
    return render(request, "_job_list.html", context, session=user)


# --- one job -------------------------------------------------------------------------------


def _job(db: SessionDep, user: DashboardSession, job_id: uuid.UUID) -> Job:
    return get_job(db, user.principal.tenant_id, job_id)


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: uuid.UUID, db: SessionDep, user: UserDep) -> Response:
    page = views.job_page(db, _job(db, user, job_id))
    return render(request, "job.html", {"page": page}, session=user, tenant=_tenant_name(db, user))


@router.get("/jobs/{job_id}/live")
def job_live(
    request: Request,
    job_id: uuid.UUID,
    db: SessionDep,
    user: UserDep,
    seen: Annotated[str | None, Query(max_length=64)] = None,
    status: StatusParam = None,
) -> Response:
    """The job page's live parts: 204 while nothing changed; otherwise each part again (out of
    band), the actions only when the status changed, so keyboard focus stays put."""
    job = _job(db, user, job_id)
    if seen == views.job_signature(job, list_iterations(db, job), views.job_exports(db, job)):
        return Response(status_code=204)
    page = views.job_page(db, job)
    return render(
        request,
        "_job_live.html",
        {"page": page, "status_changed": status != page.job.status.value},
        session=user,
    )


def _transition(
    request: Request,
    job_id: uuid.UUID,
    target: JobStatus,
    db: SessionDep,
    user: DashboardSession,
    csrf_token: str | None,
) -> Response:
    _csrf(request, user, csrf_token)
    request_transition(db, _job(db, user, job_id), target)
    db.commit()
    return _redirect(f"/jobs/{job_id}")


@router.post("/jobs/{job_id}/pause")
def pause(
    request: Request, job_id: uuid.UUID, db: SessionDep, user: UserDep, csrf_token: CsrfForm = None
) -> Response:
    return _transition(request, job_id, JobStatus.paused, db, user, csrf_token)


@router.post("/jobs/{job_id}/resume")
def resume(
    request: Request, job_id: uuid.UUID, db: SessionDep, user: UserDep, csrf_token: CsrfForm = None
) -> Response:
    return _transition(request, job_id, JobStatus.running, db, user, csrf_token)


@router.post("/jobs/{job_id}/cancel")
def cancel(
    request: Request, job_id: uuid.UUID, db: SessionDep, user: UserDep, csrf_token: CsrfForm = None
) -> Response:
    return _transition(request, job_id, JobStatus.cancelled, db, user, csrf_token)


@router.get("/jobs/{job_id}/delete")
def delete_page(request: Request, job_id: uuid.UUID, db: SessionDep, user: UserDep) -> Response:
    job = _job(db, user, job_id)
    return render(
        request,
        "delete.html",
        {"job": job, "terminal": job.status in JOB_TERMINAL},
        session=user,
        tenant=_tenant_name(db, user),
    )


@router.post("/jobs/{job_id}/delete")
def delete(
    request: Request, job_id: uuid.UUID, db: SessionDep, user: UserDep, csrf_token: CsrfForm = None
) -> Response:
    _csrf(request, user, csrf_token)
    delete_job(db, _job(db, user, job_id))
    db.commit()
    return _redirect("/?deleted=true")


@router.post("/jobs/{job_id}/exports")
def create_export(
    request: Request,
    job_id: uuid.UUID,
    db: SessionDep,
    user: UserDep,
    csrf_token: CsrfForm = None,
    format_: Annotated[Text, Form(alias="format", max_length=32)] = "jsonl",
) -> Response:
    _csrf(request, user, csrf_token)
    request_export(db, _job(db, user, job_id), format_)
    db.commit()
    return _redirect(f"/jobs/{job_id}#exports")


@router.get("/jobs/{job_id}/exports/{export_id}/download")
def download_export(
    job_id: uuid.UUID, export_id: uuid.UUID, db: SessionDep, user: UserDep
) -> Response:
    job = _job(db, user, job_id)
    export = get_export(db, user.principal.tenant_id, export_id)
    if export.job_id != job.id:
        raise NotFound(f"export {export_id} not found")
    if export.status is not ExportStatus.succeeded or not export.path:
        raise Conflict(
            f"export {export_id} is {export.status.value}",
            details=[{"field": "status", "message": export.status.value}],
        )
    path = Path(export.path)
    if not path.is_file():
        raise Conflict(
            f"the file of export {export_id} is no longer on disk; export again",
            details=[{"field": "path", "message": "missing"}],
        )
    return FileResponse(path, media_type="application/x-ndjson", filename=path.name)


# --- samples -------------------------------------------------------------------------------


def _filters(
    iteration: str | None,
    kind: str | None,
    status: str | None,
    label: str | None,
    q: str | None,
) -> ExampleFilters:
    number: int | None = None
    if iteration:
        try:
            number = int(iteration)
        except ValueError:
            number = -1
        if not 0 <= number <= PG_INT_MAX:
            raise ValidationFailed(
                f"iteration: {iteration[:20]!r} is not an iteration number",
                details=[{"field": "iteration", "message": "a whole number, 0 or more"}],
            )
    if kind and kind not in {k.value for k in ExampleKind}:
        raise ValidationFailed(
            f"kind: {kind[:40]!r} is not an example kind",
            details=[{"field": "kind", "message": f"one of {[k.value for k in ExampleKind]}"}],
        )
    if status and status not in {s.value for s in ExampleStatus}:
        raise ValidationFailed(
            f"status: {status[:40]!r} is not accepted or rejected",
            details=[{"field": "status", "message": "accepted or rejected"}],
        )
    return ExampleFilters(
        iteration=number,
        kind=kind or None,
        status=ExampleStatus(status) if status else None,
        label=label or None,
        text=(q or "").strip() or None,
    )


@router.get("/jobs/{job_id}/examples")
def examples_page(
    request: Request,
    job_id: uuid.UUID,
    db: SessionDep,
    user: UserDep,
    iteration: Annotated[str | None, Query(max_length=12)] = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    status: StatusParam = None,
    label: Annotated[Text | None, Query(max_length=200)] = None,
    q: Annotated[Text | None, Query(max_length=200)] = None,
    cursor: CursorParam = None,
) -> Response:
    job = _job(db, user, job_id)
    filters = _filters(iteration, kind, status, label, q)
    rows, next_cursor = list_examples(db, job, filters, cursor=cursor, limit=EXAMPLES_PER_PAGE)
    iterations = list_iterations(db, job)
    numbers = {it.id: it.number for it in iterations}
    query = {
        "iteration": "" if filters.iteration is None else str(filters.iteration),
        "kind": filters.kind or "",
        "status": filters.status.value if filters.status else "",
        "label": filters.label or "",
        "q": filters.text or "",
    }
    return render(
        request,
        "examples.html",
        {
            "job": job,
            "examples": [
                (ex, numbers.get(ex.iteration_id) if ex.iteration_id else None) for ex in rows
            ],
            "total": count_examples(db, job, filters),
            "filters": query,
            "filtered": any(query.values()),
            "query_string": urlencode({k: v for k, v in query.items() if v}),
            "next_cursor": next_cursor,
            "cursor": cursor,
            "iterations": [it.number for it in iterations if it.number > 0],
            # Seed rows stay in their dataset; the examples are what the teacher wrote.
            "kinds": [k.value for k in ExampleKind if k is not ExampleKind.seed],
            "labels": views.job_labels(job),
        },
        session=user,
        tenant=_tenant_name(db, user),
    )


@router.get("/jobs/{job_id}/examples/{example_id}")
def lineage_page(
    request: Request,
    job_id: uuid.UUID,
    example_id: uuid.UUID,
    db: SessionDep,
    user: UserDep,
    back: Annotated[str | None, Query(max_length=2000)] = None,
) -> Response:
    job = _job(db, user, job_id)
    lineage = example_lineage(db, job, get_example(db, job, example_id))
    # `back` is the sample browser's query string: the way back keeps the user's filters.
    back_query = urlencode(parse_qsl(back or ""))
    return render(
        request,
        "lineage.html",
        {
            "job": job,
            "lineage": lineage,
            "target_reasons": views.TARGET_REASONS,
            "back": f"/jobs/{job_id}/examples" + (f"?{back_query}" if back_query else ""),
        },
        session=user,
        tenant=_tenant_name(db, user),
    )

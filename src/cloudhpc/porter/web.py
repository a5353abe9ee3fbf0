"""The read-only web view of jobs: `/ui/` (your jobs), `/ui/jobs/{id}` (one job), `/ui/login`.

Same tokens as the API. A browser cannot send a bearer header when following a link, so the login
page puts the token in a cookie that holds nothing else: HttpOnly (no script reads it), SameSite=Strict
(no other site's page sends it), Secure over https, no Path (the browser scopes it to the `ui/`
directory under whatever prefix a gateway serves porter at) and no expiry (gone with the browser
session). A revoked token stops working here as in the API (the same cache, `principal_for_token`).
The `Authorization` header works too (a proxy that injects it).

Every route is a GET except login and logout, and none changes a job: the API's POST routes keep
taking only the bearer header, never this cookie, so a cross-site form can do nothing. The pages'
live parts poll `/ui/api/...`, cookie-authenticated mirrors of the API's own GET routes (the same
functions are called, so the view shows exactly what the API shows: redacted, only your jobs, a 404
for another user's job). Pages carry a per-response CSP nonce: only the view's own scripts run,
even if some value ever slipped past `web_render`'s escaping.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit
from uuid import UUID

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from cloudhpc.domain.api import JobPage
from cloudhpc.domain.jobs import Job
from cloudhpc.domain.states import JobState
from cloudhpc.exceptions import HttpProblem
from cloudhpc.porter import routes_artifacts, routes_estimate, routes_jobs
from cloudhpc.porter.auth import principal_for_token, require_user
from cloudhpc.porter.state import state_of
from cloudhpc.porter.web_render import (
    MAX_TASK_ROWS,
    error_page,
    estimate_page,
    job_list_page,
    job_page,
    login_page,
)
from cloudhpc.store import Principal, decode_cursor

__all__ = ["COOKIE", "router"]

router = APIRouter(prefix="/ui", include_in_schema=False)

COOKIE = "cloudhpc_ui"
PAGE_SIZE = 50
MAX_LOGIN_BODY = 8192
_NEXT = re.compile(r"^(jobs/[0-9a-fA-F-]{36})?$")
"""Where a login may send the browser back to: a page of the view, by a path relative to `/ui/`
(never an absolute URL: no open redirect)."""


def _headers(nonce: str) -> dict[str, str]:
    """The pages' security headers: only this response's scripts and styles run; framing only by
    pages of the same origin (the Kubeflow dashboard serves it under its own host)."""
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'self'"
    )
    return {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        # the pages' own URLs (job ids) stay home; same-origin requests keep their real `Origin`
        # (with no-referrer, a browser sends `Origin: null` even for the view's own login form)
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def _html(body: str, nonce: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=_headers(nonce))


def _token(request: Request) -> str:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.cookies.get(COOKIE, "").strip()


async def _principal(request: Request) -> Principal | None:
    """Who the request's header or cookie speaks for; None without a token or with a bad one."""
    token = _token(request)
    return await principal_for_token(state_of(request), token) if token else None


async def _api_user(request: Request) -> Principal:
    """For `/ui/api/...`: the API's 401 and 403, so the page's script knows to reload to the login."""
    principal = await _principal(request)
    if principal is None:
        raise HttpProblem(
            401, "unauthorized", "log in at /ui/login (or send `Authorization: Bearer <token>`)"
        )
    return await require_user(principal)


WebUser = Annotated[Principal, Depends(_api_user)]


async def _page(
    request: Request,
    base: str,
    next_path: str,
    build: Callable[[Principal, str], Awaitable[str]],
) -> Response:
    """A page for a logged-in user, or the redirect to the login; an `HttpProblem` (another user's
    job: 404) becomes an HTML page with its status instead of the API's JSON."""
    nonce = secrets.token_urlsafe(16)
    principal = await _principal(request)
    if principal is None:
        target = f"{base}login" + (f"?next={quote(next_path)}" if next_path else "")
        # a revoked token's cookie stays until the login replaces it: a deletion from this path
        # would not match the cookie's (the login's directory)
        return RedirectResponse(target, status_code=303)
    try:
        await require_user(principal)
        return _html(await build(principal, nonce), nonce)
    except HttpProblem as exc:
        page = error_page(exc.status, exc.message, nonce=nonce, base=base, user=principal.user)
        return _html(page, nonce, exc.status)


@router.get("/login")
async def login_form(next: str = "") -> Response:
    nonce = secrets.token_urlsafe(16)
    return _html(login_page(nonce=nonce, next_path=next if _NEXT.match(next) else ""), nonce)


def _same_origin(request: Request) -> bool:
    """A login form posted from another site's page (login CSRF) is refused: browsers send
    `Origin` with every POST, and `Sec-Fetch-Site`; a client with neither (curl) is no browser to
    attack."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


def _https(request: Request) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"


@router.post("/login")
async def login(request: Request) -> Response:
    """The token of the form, checked like a bearer token, kept in the cookie; back to `next`."""
    nonce = secrets.token_urlsafe(16)
    if not _same_origin(request):
        return _html(login_page(nonce=nonce, error="a login from another site is refused"), nonce, 403)
    body = await request.body()
    form = parse_qs(body[:MAX_LOGIN_BODY].decode("utf-8", "replace"), max_num_fields=4)
    token = (form.get("token") or [""])[0].strip()
    next_path = (form.get("next") or [""])[0]
    next_path = next_path if _NEXT.match(next_path) else ""
    principal = await principal_for_token(state_of(request), token) if token else None
    if principal is None:
        page = login_page(nonce=nonce, error="invalid or revoked token", next_path=next_path)
        return _html(page, nonce, 401)
    if principal.role not in ("user", "admin"):
        page = login_page(nonce=nonce, error=f"a {principal.role} token cannot use the web view")
        return _html(page, nonce, 403)
    response = RedirectResponse(f"./{next_path}", status_code=303)
    response.set_cookie(COOKIE, token, path=None, httponly=True, samesite="strict", secure=_https(request))
    return response


@router.post("/logout")
async def logout() -> Response:
    """Forgets the cookie (set from `login`, this route's directory: the same default path)."""
    response = RedirectResponse("login", status_code=303)
    response.set_cookie(COOKIE, "", max_age=0, path=None, httponly=True, samesite="strict")
    return response


async def _jobs(request: Request, principal: Principal, cursor: str | None) -> Response:
    """The API's `GET /jobs` page (the cursor checked as its query validator does)."""
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except ValueError:
            raise HttpProblem(
                422,
                "invalid_request",
                "invalid request: cursor: not a cursor of this list",
                [{"field": "cursor", "message": "not a cursor of this list"}],
            ) from None
    return await routes_jobs.list_jobs(
        request, principal, state_filter=None, cluster=None, name=None, limit=PAGE_SIZE, cursor=cursor
    )


@router.get("/")
async def jobs_page(
    request: Request, cursor: Annotated[str | None, Query(max_length=256)] = None
) -> Response:
    async def build(principal: Principal, nonce: str) -> str:
        answer = await _jobs(request, principal, cursor)
        page = JobPage.model_validate_json(bytes(answer.body))
        return job_list_page(
            page.jobs, next_cursor=page.next_cursor, nonce=nonce, user=principal.user, poll="api/jobs"
        )

    return await _page(request, "./", "", build)


async def _artifact_links(request: Request, job: Job, principal: Principal) -> list[dict[str, str]]:
    """The API's artifact listing, with porter's own download route (which needs the bearer
    header) replaced by the view's (which takes the cookie); presigned S3 URLs stay as they are."""
    listing = await routes_artifacts.list_artifacts(job.id, request, principal)
    links = []
    for item in listing.artifacts:
        name = quote(item.name, safe="/")  # as list_artifacts puts it in porter's route
        api_route = str(request.url_for("download_artifact", job_id=str(job.id), name=name))
        url = item.url
        if url == api_route:
            url = f"../jobs/{job.id}/artifacts/{quote(item.name)}"
        links.append({"name": item.name, "url": url})
    return links


def _job_id(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise HttpProblem(404, "not_found", "no such job (or it is not yours)") from None


@router.get("/jobs/{job_id}")
async def one_job_page(job_id: str, request: Request) -> Response:
    async def build(principal: Principal, nonce: str) -> str:
        answer = await routes_jobs.get_job(_job_id(job_id), request, principal, wait=0, since_state=None)
        job = Job.model_validate_json(bytes(answer.body))  # as the API shows it: redacted
        state = state_of(request)
        reached: dict[JobState, datetime] = {}
        for t in await state.store.transitions(job.id):
            reached.setdefault(t.to_state, t.at)
        try:
            accounting: dict[str, Any] | None = await routes_jobs.job_accounting(job.id, request, principal)
        except HttpProblem as exc:
            if exc.code != "not_available":
                raise
            accounting = None
        artifacts = await _artifact_links(request, job, principal)
        tasks = None
        if job.spec.array is not None:
            page = await routes_jobs.job_tasks(
                job.id, request, principal, cursor=None, limit=MAX_TASK_ROWS + 1
            )
            tasks = page.tasks
        return job_page(
            job,
            tasks=tasks,
            reached=reached,
            accounting=accounting,
            artifacts=artifacts,
            nonce=nonce,
            user=principal.user,
        )

    return await _page(request, "../", f"jobs/{job_id}" if _NEXT.match(f"jobs/{job_id}") else "", build)


@router.get("/jobs/{job_id}/estimate")
async def job_estimate_page(job_id: str, request: Request) -> Response:
    """The API's estimate (`POST /api/v1/jobs:estimate`) of the job's own spec, on demand."""

    async def build(principal: Principal, nonce: str) -> str:
        answer = await routes_jobs.get_job(_job_id(job_id), request, principal, wait=0, since_state=None)
        job = Job.model_validate_json(bytes(answer.body))
        estimate = await routes_estimate.estimate_job(job.spec, request, principal)
        return estimate_page(job, estimate, nonce=nonce, user=principal.user)

    return await _page(request, "../../", f"jobs/{job_id}" if _NEXT.match(f"jobs/{job_id}") else "", build)


@router.get("/jobs/{job_id}/artifacts/{name:path}")
async def artifact(job_id: UUID, name: str, request: Request, principal: WebUser) -> Response:
    """The API's download, with the cookie; `sandbox` keeps any file from acting as a page of the
    view, whatever its content."""
    response = await routes_artifacts.download_artifact(job_id, name, request, principal)
    response.headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@router.get("/api/jobs")
async def api_jobs(
    request: Request, principal: WebUser, cursor: Annotated[str | None, Query(max_length=256)] = None
) -> Response:
    return await _jobs(request, principal, cursor)


@router.get("/api/jobs/{job_id}")
async def api_job(
    job_id: UUID,
    request: Request,
    principal: WebUser,
    wait: Annotated[float, Query(ge=0, le=routes_jobs.MAX_WAIT_SECONDS)] = 0,
    since_state: Annotated[JobState | None, Query()] = None,
) -> Response:
    return await routes_jobs.get_job(job_id, request, principal, wait=wait, since_state=since_state)


@router.get("/api/jobs/{job_id}/logs")
async def api_logs(
    job_id: UUID,
    request: Request,
    principal: WebUser,
    offset: Annotated[int, Query(ge=0, le=routes_jobs.MAX_OFFSET)] = 0,
) -> Response:
    return await routes_jobs.job_logs(
        job_id, request, principal, offset=offset, follow=False, limit=routes_jobs.LOG_CHUNK
    )

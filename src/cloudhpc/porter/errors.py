"""One table from exceptions to HTTP answers, and the one JSON error shape.

Every error leaves porter as `{"error": {"code", "message", "details"}}`. Callers' mistakes are 4xx
with the offending field named; a 500 means a bug in porter, never bad input.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudhpc import exceptions as exc

__all__ = ["error_body", "install_error_handlers", "status_for"]

log = logging.getLogger(__name__)


# Most specific first: the first matching class wins. An `HttpProblem` carries its own answer.
_TABLE: list[tuple[type[Exception], int, str]] = [
    (exc.IdempotencyConflict, 409, "idempotency_conflict"),
    (exc.InvalidTransition, 409, "invalid_transition"),
    (exc.QuotaExceeded, 403, "quota_exceeded"),
    (exc.SubmitRejected, 400, "submit_rejected"),
    (exc.JobNotFound, 404, "not_found"),
    (exc.CommandTimeout, 504, "command_timeout"),
    (exc.SSHConnectError, 502, "ssh_unavailable"),
    (exc.SSHError, 502, "ssh_error"),
    (exc.BridgesNotConfigured, 422, "invalid_request"),
    (exc.ConfigError, 500, "config_error"),
    (exc.UnknownJob, 404, "not_found"),
    (exc.BridgePortsExhausted, 503, "bridge_ports_exhausted"),
    (exc.StoreError, 503, "store_unavailable"),
    (exc.ObjectNotFound, 404, "not_found"),
    (exc.StorageError, 502, "storage_unavailable"),
    (exc.KubernetesError, 502, "kubernetes_unavailable"),
    (exc.CloudHPCError, 500, "internal_error"),
]


def status_for(error: Exception) -> tuple[int, str]:
    """The HTTP status and error code for one of our exceptions (first matching row of the table)."""
    if isinstance(error, exc.HttpProblem):
        return error.status, error.code
    for cls, status, code in _TABLE:
        if isinstance(error, cls):
            return status, code
    return 500, "internal_error"


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or "(body)"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(exc.HttpProblem)
    async def _problem(_: Request, error: exc.HttpProblem) -> JSONResponse:
        return JSONResponse(error_body(error.code, error.message, error.details), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        details = [{"field": _field(e.get("loc", ())), "message": e.get("msg", "")} for e in error.errors()]
        first = details[0] if details else {"field": "(body)", "message": "invalid"}
        message = f"invalid request: {first['field']}: {first['message']}"
        return JSONResponse(error_body("invalid_request", message, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 400:  # FastAPI could not read the body (not UTF-8): bad input like any other
            message = f"invalid request: (body): {error.detail}"
            details = [{"field": "(body)", "message": str(error.detail)}]
            return JSONResponse(error_body("invalid_request", message, details), status_code=422)
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return JSONResponse(error_body(code, str(error.detail)), status_code=error.status_code)

    @app.exception_handler(exc.CloudHPCError)
    async def _domain(_: Request, error: exc.CloudHPCError) -> JSONResponse:
        status, code = status_for(error)
        if status >= 500:
            log.error("request failed: %s: %s", type(error).__name__, error)
        return JSONResponse(error_body(code, str(error)), status_code=status)

"""The error answers in porter's OpenAPI schema.

Every route under `/api/v1` can answer with the one error shape (`porter/errors.py`), and the
schema says so: without this FastAPI documents only its own 422 body (`{"detail": [...]}`), which
porter never sends, and none of 401, 403, 404, 413. A client generated from the schema, or
schemathesis checking answers against it (`tests/integration/test_schema_fuzz.py`), then sees
every status porter actually gives.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["ERROR_ANSWERS", "ERROR_RESPONSES", "ErrorBody"]


class ErrorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    """`{"error": {"code", "message", "details"}}`: every answer of status 400 and above."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorInfo


ERROR_ANSWERS: dict[int, str] = {
    401: "no bearer token, or an unknown or revoked one (`unauthorized`)",
    403: "the token's role may not use this route, or the agent is not bound to the cluster (`forbidden`)",
    404: "no such job or cluster, or one that is not yours (`not_found`, `not_available`)",
    409: "a conflict: an Idempotency-Key reused with another spec, another agent serving the cluster",
    413: "the request body is over porter.max_request_bytes, or a route's own cap (`too_large`); "
    "`details.limit` is the limit in bytes",
    422: "bad input; `details` names every bad field (`invalid_request`)",
    503: "the job store does not answer, or no bridge port is free (retry)",
}
"""Status -> when porter gives it; docs/api.md has the table with every code."""


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description} for status, description in ERROR_ANSWERS.items()
}
"""For `FastAPI(responses=...)`: every route gets them, a route's own `responses=` takes precedence."""

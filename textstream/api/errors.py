"""Domain errors, and the one place they become HTTP (as vLLM's `build_app` does).

Code inside the API raises these, and the handlers here answer them; the few
answers given outside a handler (an ASGI middleware's refusal, a job that ended in
error and was not streamed) go through the same builder, `error_response`.
Each error class carries its status, its `type` and its headers. Bodies come in
two shapes, chosen by path:

- ours, `{"error": {"type", "message", "field"?}}`: the same object a stream's
  `error` event carries (transport.events.error_data);
- OpenAI's under `/v1`, `{"error": {"message", "type", "param", "code"}}`, where
  invalid input is 400 rather than 422, so the `openai` SDK raises its usual
  exceptions with our message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisClusterException, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from textstream.connections import UNREACHABLE
from textstream.logs import redact_path
from textstream.transport.events import ErrorType, error_data

log = logging.getLogger(__name__)

#: Seconds a client should wait before retrying a 503 (Redis away) or a full queue.
RETRY_AFTER = "2"


class ServiceError(Exception):
    """A refusal with a status: subclasses say which."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "error"
    field: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidInputError(ServiceError, ValueError):
    """Input the API refuses; `field` names it in the body."""

    status, error_type = 422, "invalid_request"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthError(InvalidInputError):
    """A prompt over the model's context window, in the words OpenAI's API uses:
    clients match them (litellm's ContextWindowExceededError looks for "maximum
    context length is", langchain-openai's ContextOverflowError for the code
    `context_length_exceeded`), to trim the conversation and retry."""

    error_type = "context_length_exceeded"

    def __init__(self, field: str, tokens: int, window: int) -> None:
        noun = "messages" if field == "messages" else "prompt"
        super().__init__(
            field,
            f"This model's maximum context length is {window} tokens. However, your {noun}"
            f" resulted in {tokens} tokens. Please reduce the length of the {noun}.",
        )


class BadHeaderError(InvalidInputError):
    """A request header the API cannot use: a bad request (400) naming it."""

    status = 400


class BadEventIdError(BadHeaderError):
    """A Last-Event-ID that cannot name an event of this job: a malformed header is
    a bad request (400), answered at once rather than waited on."""


class JobNotFoundError(ServiceError, LookupError):
    """No such job: never created, or expired after JOB_TTL."""

    status, error_type = 404, "not_found"

    def __str__(self) -> str:
        return "no such job: unknown id, or its events expired (JOB_TTL)"


class JobFinishedError(ServiceError):
    status, error_type = 409, "job_finished"

    def __str__(self) -> str:
        return "the job already ended"


class QueueFullError(ServiceError):
    """MAX_QUEUED_JOBS jobs are already waiting."""

    status, error_type = 429, "queue_full"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": RETRY_AFTER}


class ServerBusyError(ServiceError):
    """This API process has more submissions in hand than it can take in time
    (MAX_SUBMITTING, waited ADMISSION_WAIT_SECONDS): the process is the bottleneck,
    not Redis, so 429 and not 503."""

    status, error_type = 429, "server_busy"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": RETRY_AFTER}


class QueueUnavailableError(ServiceError):
    """Redis (and so the queue) could not take the job in time."""

    status, error_type = 503, "queue_unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": RETRY_AFTER}


class UnauthorizedError(ServiceError, PermissionError):
    """No valid API key (or stream token)."""

    status, error_type = 401, "unauthorized"

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class RateLimitedError(ServiceError):
    status, error_type = 429, "rate_limited"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


#: FastAPI's HTTPException detail for a body it could not parse at all.
BODY_PARSE_ERROR = "There was an error parsing the body"

#: Status codes for a job that ended in error, when the answer is not streamed.
JOB_ERROR_STATUS: dict[str, int] = {
    ErrorType.PROMPT_TOO_LONG: 422,
    ErrorType.INVALID_RESPONSE_FORMAT: 400,
    ErrorType.INVALID_TOOLS: 400,
    ErrorType.INVALID_LOGPROBS: 400,
    ErrorType.CANCELLED: 409,
    ErrorType.TIMEOUT: 504,
    ErrorType.QUEUE_TIMEOUT: 503,
    ErrorType.QUEUE_FULL: 429,
    ErrorType.GENERATION_FAILED: 502,
    ErrorType.UPSTREAM_ERROR: 502,
    ErrorType.REDIS_UNAVAILABLE: 503,
    ErrorType.SHUTDOWN: 503,
    ErrorType.NO_WORKER: 503,
}
#: Our error types as OpenAI's `type` field names them.
OPENAI_TYPES = {
    "invalid_request": "invalid_request_error",
    "context_length_exceeded": "invalid_request_error",
    "prompt_too_long": "invalid_request_error",
    "not_found": "invalid_request_error",
    "model_not_found": "invalid_request_error",
    "queue_full": "rate_limit_error",
    "server_busy": "rate_limit_error",
    "rate_limited": "rate_limit_error",
    "queue_unavailable": "server_error",
    "redis_unavailable": "server_error",
    "internal_error": "server_error",
}


#: Our error types whose OpenAI `code` differs: a worker's `prompt_too_long` (the
#: API had no tokenizer to check with) is the context-length error clients know.
OPENAI_CODES = {"prompt_too_long": "context_length_exceeded"}


def openai_error_body(error_type: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, in a response body or in a stream's `data:` line."""
    return {
        "error": {
            "message": message,
            "type": OPENAI_TYPES.get(error_type, error_type),
            "param": param,
            "code": OPENAI_CODES.get(error_type, error_type),
        }
    }


def is_openai(request: Request) -> bool:
    return request.url.path.startswith("/v1/")


def refusal_body(path: str, error_type: str, message: str) -> bytes:
    """An error body written outside the app (an ASGI middleware's or the server's
    refusal, where there is no Request): OpenAI's shape under /v1, else ours."""
    if path.startswith("/v1/"):
        return json.dumps(openai_error_body(error_type, message)).encode()
    return json.dumps(error_data(error_type, message)).encode()


def route_of(request: Request) -> str:
    """What a log line may say of where a request went: its route's template
    (`/completion/{question:text}`), never the path itself, which can hold a
    prompt; a path no route matched, redacted as the request log does."""
    route = request.scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else redact_path(request.url.path)


def error_response(
    request: Request,
    status: int,
    error_type: str,
    message: str,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The one builder of error responses: our shape, or OpenAI's under /v1."""
    if is_openai(request):
        body = openai_error_body(error_type, message, field)
        return JSONResponse(body, 400 if status == 422 else status, headers=headers)
    body = error_data(error_type, message)
    body["error"].update({"field": field} if field is not None else {}, **extra)
    return JSONResponse(body, status, headers=headers)


def job_error_response(
    request: Request, error: dict[str, Any] | None, headers: Mapping[str, str]
) -> JSONResponse:
    """A job that ended in error, answered without streaming."""
    error = error or {"type": "error", "message": "the job failed"}
    status = JOB_ERROR_STATUS.get(error["type"], 502)
    if status == 503:  # Redis lost, or this process stopping: worth a retry, later
        headers = {**headers, "Retry-After": RETRY_AFTER}
    return error_response(request, status, error["type"], error["message"], headers=headers)


async def refund(request: Request) -> None:
    """A refused request takes back its count against RATE_LIMIT (edge.settle)."""
    give_back = getattr(request.state, "refund", None)
    request.state.refund = None
    if give_back is not None:
        with contextlib.suppress(*UNREACHABLE):
            await give_back()


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal raised inside the app goes through one of these, and takes its
    rate count back. (The caller's own refusals are answered before: edge.py.)"""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        await refund(request)
        return error_response(request, exc.status, exc.error_type, str(exc), exc.field, exc.headers)

    @app.exception_handler(RedisError)
    @app.exception_handler(RedisClusterException)
    @app.exception_handler(TimeoutError)
    @app.exception_handler(ConnectionError)
    async def _redis(request: Request, exc: Exception) -> JSONResponse:
        """Redis (or the network to it) failed while answering: a 503 the client can
        retry, never a 500. Either role counts (the queue's Redis, the streams'
        Redis or cluster: `RedisClusterException` is not a RedisError). Streams
        already open ride out outages themselves."""
        log.warning("Redis unavailable during %s: %s", route_of(request), type(exc).__name__)
        await refund(request)
        message = "the job store (Redis) is unreachable; retry shortly"
        headers = {"Retry-After": RETRY_AFTER}
        return error_response(request, 503, "redis_unavailable", message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        """A bug: still the JSON error shape (Starlette logs the traceback)."""
        return error_response(request, 500, "internal_error", "internal error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Every error body has the same shape, routing errors (404, 405) included."""
        await refund(request)
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            # FastAPI's answer to a body json.loads cannot even read (not UTF-8,
            # nested past the recursion limit): invalid input like any other.
            message = "the body is not valid JSON (UTF-8 text, nested at most ~1000 deep)"
            return error_response(request, 422, "invalid_request", message, "body")
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, exc.status_code, kind, str(exc.detail), headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        await refund(request)
        errors = exc.errors()
        field = field_of(errors[0]["loc"]) if errors else ""
        if errors and errors[0]["type"] == "json_invalid":
            field = "body"  # its loc holds the character offset, not a field
        message = errors[0]["msg"] if errors else "invalid request"
        detail = [{"loc": e["loc"], "msg": e["msg"], "type": e["type"]} for e in errors]
        return error_response(request, 422, "invalid_request", message, field, detail=detail)


#: Parts of a pydantic error location that name a type, not a field: the branch of
#: a union (`prompt.str`, `prompt.list[str]`) or a validator (`function-after[...]`).
_TYPE_PART = re.compile(
    r"^(str|int|float|bool|bytes|none|list|dict|tuple|literal|union)(\[.*\])?$"
    r"|^(function|constrained|json|lax|tagged|nullable|default)-[a-z-]+(\[.*\])?$"
)


def field_of(loc: Sequence[int | str]) -> str:
    """The request field an error is about, as the client wrote it: the location
    without its first part (body, query, path) and without type names."""
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or not _TYPE_PART.search(str(p))]
    return ".".join(parts)

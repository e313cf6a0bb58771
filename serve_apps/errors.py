"""Bad input → a 4xx whose body names the field and the problem (never a 500, never a dead replica).

Every error body has FastAPI's validation shape, so clients parse one format:
``{"detail": [{"loc": ["body", ...], "msg": "...", "type": "..."}]}``.
"""

from __future__ import annotations

import re
import time
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

_INDEXED = re.compile(r"^(?P<field>\w+)\[(?P<index>\d+)\](?: \(slate (?P<slate>\d+), position (?P<pos>\d+)\))?")


class ErrorDetail(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error an app answers: FastAPI's validation shape."""

    detail: list[ErrorDetail]


def error_responses(*codes: int) -> dict[int, dict]:
    """``responses=`` for a route: each status code it can answer besides 200, in the OpenAPI schema."""
    return {code: {"model": ErrorBody, "description": HTTPStatus(code).phrase} for code in codes}


class BadRequest(Exception):
    """A domain-level input error: ``status`` (4xx), where it is (``loc``), and what is wrong."""

    def __init__(self, loc: list, msg: str, status: int = 422, type_: str = "value_error"):
        super().__init__(msg)
        self.loc, self.msg, self.status, self.type = loc, msg, status, type_

    def __reduce__(self):  # crosses DeploymentHandle calls intact (else Ray reports a 500)
        return BadRequest, (self.loc, self.msg, self.status, self.type)


def loc_from_kernel_error(message: str, prefix: list, field_names: dict[str, str]) -> list:
    """Map a kernel message like 'dwell[4] (slate 1, position 1) = …' to a JSON location."""
    m = _INDEXED.match(message)
    if not m:
        return prefix
    field = field_names.get(m["field"], m["field"])
    if m["slate"] is not None:
        return [*prefix, "slates", int(m["slate"]), field, int(m["pos"])]
    return [*prefix, field, int(m["index"])]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def _bad_request(_: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": [{"loc": exc.loc, "msg": exc.msg, "type": exc.type}]}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the offending input, which may be NaN/inf (not valid JSON): a 500.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # the framework's own 4xx (a body it cannot read as the declared type: 400; no such route: 404; wrong
        # method: 405; a streamed body over the limit: 413, BodyLimit) in the
        # same shape as every other error, headers (e.g. Allow) kept
        loc = ["body"] if exc.status_code in (400, 413) else ["path"]
        kind = "too_large" if exc.status_code == 413 else "http_error"
        body = {"detail": [{"loc": loc, "msg": str(exc.detail), "type": kind}]}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


BODY_ERRORS = (400, 413, 422)  # not JSON / larger than the app's limit / not what the schema says


def body_error_responses(*codes: int) -> dict[int, dict]:
    """``responses=`` for a route that reads a request body: ``BODY_ERRORS`` plus its own ``codes``."""
    return error_responses(*sorted(set(BODY_ERRORS) | set(codes)))


class BodyTooLarge(StarletteHTTPException):
    """413 for a body over an app's limit; an HTTPException, so FastAPI's body parsing passes it on to the
    app's handler (any other error there becomes a 400 "error parsing the body")."""

    def __init__(self, size: str, limit: int):
        super().__init__(413, f"request body of {size} bytes exceeds this app's limit of {limit} bytes")


class BodyLimit:
    """Pure-ASGI middleware: a request body over ``max_bytes`` is answered 413 in the usual error shape — at once
    when its Content-Length says so, else (a chunked upload) as soon as the streamed bytes pass the limit, before
    the application has parsed it. FastAPI's own ``max_body_size`` answers plain text for the first case."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            too_large = BodyTooLarge(length.decode(), self.max_bytes)
            body = {"detail": [{"loc": ["body"], "msg": too_large.detail, "type": "too_large"}]}
            return await JSONResponse(body, status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(f"more than {self.max_bytes}", self.max_bytes)
            return message

        await self.app(scope, limited, send)


class ServerTiming:
    """Pure-ASGI middleware: adds ``app;dur=<ms>`` (request in → response start), the time a request spends
    inside the replica's application, to the ``server-timing`` header (after any metrics the handler set
    there, e.g. /recommend's per-stage times), for load tests to collect."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def send_with_timing(message):
            if message["type"] == "http.response.start":
                app_metric = f"app;dur={(time.perf_counter() - start) * 1e3:.3f}".encode()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server-timing"]
                handler = [v for k, v in message.get("headers", []) if k.lower() == b"server-timing"]
                message["headers"] = [*headers, (b"server-timing", b", ".join([*handler, app_metric]))]
            await send(message)

        await self.app(scope, receive, send_with_timing)

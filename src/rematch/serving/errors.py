"""Every failed request gets one JSON shape, OpenAI's: ``{"error": {"message", "type", "param", "code"}}``.

Clients written against OpenAI / vLLM read ``error.message``; ``param`` names the field and
item (``input[2].image``) so a caller with a thousand items knows which one to fix. Schema
errors (unknown fields, wrong types) are 422, bad values (undecodable image, path outside
the allowed root, image too large) are 400, and a bug is a 500 whose details stay in the
server's log.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("rematch.serving")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "request_too_large", 422: "invalid_request_error", 503: "server_busy"}


class ApiError(Exception):
    """A request the server refuses; ``param`` is the field path, e.g. ``input[2].image``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class SchemaError(ApiError):
    """A field of the wrong type, a missing or unknown field: 422."""

    def __init__(self, param: str, message: str):
        super().__init__(422, f"{param}: {message}", param=param, code="invalid_type")


class BadValue(ApiError):
    """A well-typed field whose value cannot be used (an undecodable image, a forbidden path): 400."""

    def __init__(self, param: str, message: str):
        super().__init__(400, f"{param}: {message}", param=param, code="invalid_value")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def field_path(location: tuple) -> str:
    """Pydantic's ``("body", "documents", 3, "text")`` as ``documents[3].text``."""
    path = ""
    for part in location[1:] if location and location[0] == "body" else location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validation_message(error: dict) -> tuple[str, str]:
    """(param, message) of one pydantic error, in words a client can act on."""
    kind, location = error.get("type", ""), tuple(error.get("loc", ()))
    if kind == "json_invalid":
        return "body", f"body: not valid JSON ({error.get('ctx', {}).get('error', error.get('msg'))})"
    param = field_path(location)
    if kind == "extra_forbidden":
        return param, f"{param}: unknown field"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind != "missing" and "input" in error:
        message += f" (got {type(error['input']).__name__})"
    return param, f"{param}: {message}"


def install_error_handlers(app: FastAPI) -> None:
    """Route every failure through :func:`error_body`."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [validation_message(problem) for problem in error.errors()]
        message = "; ".join(dict.fromkeys(message for _, message in problems)) or "invalid request"
        return error_response(422, message, problems[0][0] if problems else None, "invalid_type")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error while serving %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error ({type(error).__name__}); see the server log")

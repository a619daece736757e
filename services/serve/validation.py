"""422 answers for invalid requests: FastAPI's `detail` list, bounded and always JSON.

FastAPI's own handler echoes every error's whole input, so a 422 grows with the request
(a 1,000-event batch came back as 76 KB), and an input JSON cannot encode (NaN, Infinity,
or 1e400, which Python's parser reads as infinity) made the handler itself fail with a
plain-text 500. Here each error keeps FastAPI's keys (`type`, `loc`, `msg`, `input`,
`ctx`); `msg` starts with where the error is (`body[3].movie_id: ...`); an input longer
than MAX_INPUT_CHARS once written as JSON is cut, sent as that JSON text with
`input_truncated: true`; non-finite numbers are echoed as the strings "NaN", "Infinity"
and "-Infinity"; at most MAX_ERRORS errors are listed and `error_count` says how many
there were.

Bodies are read by JSONBodyRoute, whose parser takes an integer longer than Python turns
into an int (4,300 digits) as the infinite float it amounts to: the field then refuses it
as it refuses 1e400, rather than the whole body failing with "error parsing the body";
arrays and objects nested past the parser's recursion limit (about 1,000 levels) are
invalid JSON, located at the character where the nesting passes MAX_JSON_DEPTH levels.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from services.serve.schemas import UNION_BRANCHES

MAX_INPUT_CHARS = 200  # of an echoed input, written as JSON
MAX_MESSAGE_CHARS = 300  # of a message: validators quote what they refuse
MAX_NAME_CHARS = 64  # of one name in a location (a client's unknown key can be any size)
MAX_ERRORS = 20
MAX_JSON_DEPTH = 100  # levels; where a body nested too deeply to parse is located
ELLIPSIS = "…"


# Named as FastAPI names its own, so the OpenAPI components keep their names.
class ValidationError(BaseModel):
    """One thing wrong with a request (FastAPI's ValidationError, bounded)."""

    type: str = Field(description="Pydantic's error type, e.g. `greater_than_equal`.")
    loc: list[str | int] = Field(description="Where: `body`, `query` or `path`, then the "
                                 "field names and array indexes.")
    msg: str = Field(description="What was wrong, after where (`body[3].movie_id: ...`).")
    input: Any = Field(None, description="The value refused; when longer than "
                       f"{MAX_INPUT_CHARS} characters as JSON, the start of its JSON text.")
    input_truncated: bool | None = Field(None, description="true when `input` was cut.")
    ctx: dict[str, Any] | None = Field(None, description="The limit or pattern broken.")


class HTTPValidationError(BaseModel):
    """A 422: every field in error (the first MAX_ERRORS) and how many there were."""

    detail: list[ValidationError]
    error_count: int = Field(description=f"Errors in the request; `detail` lists at most "
                             f"{MAX_ERRORS}.")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + ELLIPSIS


def _fragments(value: Any) -> Iterator[str]:
    """`value` as JSON text, piece by piece (so a caller can stop early), non-finite
    numbers as strings and anything JSON has no type for as its str()."""
    if value is None or isinstance(value, bool):
        yield json.dumps(value)
    elif isinstance(value, int):
        try:
            yield str(value)
        except ValueError:  # past Python's digit limit for int -> str
            yield json.dumps(f"<an integer of {value.bit_length()} bits>")
    elif isinstance(value, float):
        yield repr(value) if math.isfinite(value) else json.dumps(
            "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity"))
    elif isinstance(value, str):
        yield json.dumps(value[:MAX_INPUT_CHARS + 1])  # longer would be cut anyway
    elif isinstance(value, dict):
        yield "{"
        for index, (key, item) in enumerate(value.items()):
            yield (", " if index else "") + json.dumps(str(key)[:MAX_INPUT_CHARS + 1]) + ": "
            yield from _fragments(item)
        yield "}"
    elif isinstance(value, list | tuple):
        yield "["
        for index, item in enumerate(value):
            if index:
                yield ", "
            yield from _fragments(item)
        yield "]"
    elif isinstance(value, bytes):
        yield json.dumps(value[:MAX_INPUT_CHARS + 1].decode("utf-8", "replace"))
    else:
        yield json.dumps(str(value)[:MAX_INPUT_CHARS + 1])


def bounded_input(value: Any) -> tuple[Any, bool]:
    """`value` safe to write as JSON and at most MAX_INPUT_CHARS long; whether it was cut."""
    text, size = [], 0
    for fragment in _fragments(value):
        text.append(fragment)
        size += len(fragment)
        if size > MAX_INPUT_CHARS:
            return "".join(text)[:MAX_INPUT_CHARS] + ELLIPSIS, True
    return json.loads("".join(text)), False


def where(loc: Sequence[Any]) -> str:
    """A location as a reader writes it: ('body', 3, 'movie_id') as `body[3].movie_id`."""
    text = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + _cut(str(part), MAX_NAME_CHARS)
    return text or "request"


def _location(loc: Sequence[Any]) -> list[str | int]:
    parts = [part if isinstance(part, int) and not isinstance(part, bool)
             else _cut(str(part), MAX_NAME_CHARS) for part in loc]
    if len(parts) > 1 and parts[0] == "body" and parts[1] in UNION_BRANCHES:
        del parts[1]
    return parts


def issue(error: dict[str, Any]) -> dict[str, Any]:
    """One error of pydantic or FastAPI, bounded and JSON-safe."""
    loc = _location(error.get("loc", ()))
    kind = str(error.get("type", "value_error"))
    if kind == "json_invalid" and len(loc) == 2:  # FastAPI's loc: ('body', character offset)
        reason = (error.get("ctx") or {}).get("error", error.get("msg"))
        said = f"body: invalid JSON at character {loc[1]}: {reason}"
    else:
        said = f"{where(loc)}: {error.get('msg', 'invalid')}"
    entry: dict[str, Any] = {"type": kind, "loc": loc, "msg": _cut(said, MAX_MESSAGE_CHARS)}
    if "input" in error:
        entry["input"], truncated = bounded_input(error["input"])
        if truncated:
            entry["input_truncated"] = True
    if error.get("ctx"):
        entry["ctx"] = {str(name): bounded_input(
            value if isinstance(value, int | float | str | bool | None) else str(value))[0]
            for name, value in error["ctx"].items()}
    return entry


def problem(errors: Sequence[Any]) -> dict[str, Any]:
    """The 422 body for `errors`."""
    return {"detail": [issue(e if isinstance(e, dict) else {"msg": str(e)})
                       for e in errors[:MAX_ERRORS]],
            "error_count": len(errors)}


async def request_validation_handler(_request: Request, error: Exception) -> JSONResponse:
    """FastAPI's handler for RequestValidationError, bounded and never failing to encode."""
    errors = error.errors() if isinstance(error, RequestValidationError) else [
        {"msg": str(error)}]
    return JSONResponse(problem(list(errors)), status_code=422)


INVALID = {422: {"model": HTTPValidationError, "description": "Invalid request: each error "
                 "says where and what (inputs cut to a few hundred characters)."}}


def _json_int(text: str) -> int | float:
    """A JSON integer; one too long to convert is +-infinity, which every field refuses."""
    if len(text.lstrip("-")) > sys.get_int_max_str_digits() > 0:
        return float(text)  # a decimal this long is past a double's range
    return int(text)


def _too_deep(text: str, depth: int) -> int:
    """The offset in JSON `text` where arrays and objects reach `depth` levels (0 if never)."""
    level, quoted, escaped = 0, False, False
    for offset, char in enumerate(text):
        if quoted:
            escaped, quoted = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            quoted = True
        elif char in "[{":
            level += 1
            if level >= depth:
                return offset
        elif char in "]}":
            level -= 1
    return 0


class JSONBodyRequest(Request):
    """A request whose JSON body is parsed with `_json_int`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body, parse_int=_json_int)
            except RecursionError:
                text = body.decode("utf-8", "replace")
                raise json.JSONDecodeError("arrays and objects nested too deeply to read", text,
                                           _too_deep(text, MAX_JSON_DEPTH)) from None
        return self._json


class JSONBodyRoute(APIRoute):
    """FastAPI's route, reading the body through JSONBodyRequest."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(JSONBodyRequest(request.scope, request.receive))

        return route

"""What the API checks before a route runs, and the shape of every answer that refuses.

- :class:`BodyLimit`: a request body over :data:`~schemas.limits.BODY_BYTES` is refused with
  413 before it is read into memory: by its ``Content-Length``, or, sent in chunks, as soon as
  the bytes received pass the limit.
- :func:`validation_error`: FastAPI's 422 (:class:`RequestValidationError`) in the documented
  ``HTTPValidationError`` shape, without echoing the input (a megabyte, or a lone surrogate that
  JSON cannot even write back) and with every text valid and cut to a readable length.
- :class:`ErrorBody` and :func:`errors`: the ``{"detail": "..."}`` of every other 4xx and 503,
  documented per route, so the OpenAPI says what a client really gets.
- :class:`StreamSlots`: how many update streams (SSE) a process and one client address hold.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import HTTPException, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, Strict
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from schemas.limits import BODY_BYTES, CUBE_ID_BYTES, ID_BYTES, check_time, cut_utf8
from streams.transport.events import iso_time, text_check

#: How much of a message or a location part an error answer shows.
SHOWN_BYTES = 512


class ErrorBody(BaseModel):
    """Why a request was refused (4xx) or cannot be served now (503)."""

    detail: str


#: What each refusal means, in the OpenAPI.
_MEANING = {
    400: "A request that cannot be read (a body that is not UTF-8 JSON, a Content-Length that is "
    "not a number) or that asks for something impossible (the reason says what).",
    404: "Not found.",
    409: "Conflicts with what is running.",
    413: f"The request body is over {BODY_BYTES} bytes, or an event in it over its limit.",
    429: "Too many update streams open (retry after the Retry-After seconds).",
    503: "This process cannot serve it now (its role has no views, a processor restarts).",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route whose refusals are :class:`ErrorBody` with these statuses."""
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        out[code] = {"model": ErrorBody, "description": _MEANING[code]}
        if code == 429:
            out[code]["headers"] = {
                "Retry-After": {
                    "description": "Seconds after which a stream may be free.",
                    "schema": {"type": "integer"},
                }
            }
    return out


def _shown(value: Any) -> str:
    """A text of an error answer: valid UTF-8, at most :data:`SHOWN_BYTES`."""
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "replace").decode("utf-8")
    return cut_utf8(text, SHOWN_BYTES) + ("..." if len(text) > SHOWN_BYTES else "")


def validation_details(problems: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's errors as the documented ``ValidationError`` items: ``loc``, ``msg``,
    ``type`` (the input is not echoed: the caller has it, and it may be huge or unwritable)."""
    out = []
    for problem in problems:
        loc = [p if isinstance(p, int) else _shown(p) for p in problem.get("loc", ())]
        out.append({"loc": loc, "msg": _shown(problem.get("msg", "")),
                    "type": _shown(problem.get("type", "value_error"))})  # fmt: skip
    return out


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    """The app's handler of :class:`RequestValidationError` (FastAPI's 422)."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": validation_details(exc.errors())}, status_code=422)


def invalid(where: str, name: str, message: str) -> RequestValidationError:
    """A 422 of the documented shape for a parameter a route checks itself."""
    return RequestValidationError([{"loc": (where, name), "msg": message, "type": "value_error"}])


class BodyTooLarge(HTTPException):
    """A body over the limit, found while it was read (its length was not announced)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes, never read whole.

    A ``Content-Length`` over the limit is answered at once (the body is not read); a body sent
    without one (chunked) is counted as it arrives and refused as soon as it passes the limit.
    A ``Content-Length`` that is not a number is a 400.
    """

    def __init__(self, app: ASGIApp, limit: int = BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = [v for k, v in scope.get("headers", ()) if k == b"content-length"]
        if lengths:
            try:
                declared = max(int(v) for v in lengths)
            except ValueError:
                await _answer(send, 400, "Content-Length is not a number")
                return
            if declared > self.limit:
                await _answer(send, 413, f"the request body is {declared} bytes, over the "
                                         f"limit of {self.limit}")  # fmt: skip
                return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as exc:  # raised outside a route's exception handling
            if started:
                raise
            await _answer(send, 413, str(exc.detail))


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class StreamSlots:
    """Open update streams of a process: at most ``total``, ``per_client`` per client address.

    :meth:`acquire` gives a :class:`Slot` or None (over a cap); the slot's :meth:`Slot.release`
    is idempotent, so every way a stream ends may call it.
    """

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, client: str) -> Slot | str:
        """A slot for ``client``, or why there is none."""
        with self._lock:
            if sum(self._held.values()) >= self.total:
                return f"this server holds its maximum of {self.total} update streams"
            if self._held[client] >= self.per_client:
                return (f"client {client} holds its maximum of {self.per_client} update "
                        "streams")  # fmt: skip
            self._held[client] += 1
        return Slot(self, client)

    def _release(self, client: str) -> None:
        with self._lock:
            self._held[client] -= 1
            if self._held[client] <= 0:
                del self._held[client]

    def held(self, clients: Iterable[str] | None = None) -> int:
        with self._lock:
            if clients is None:
                return sum(self._held.values())
            return sum(self._held[c] for c in clients)


class Slot:
    """One update stream's place in :class:`StreamSlots`."""

    def __init__(self, slots: StreamSlots, client: str) -> None:
        self._slots = slots
        self._client: str | None = client

    def release(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            self._slots._release(client)


# -- parameters every route checks alike --------------------------------------------------------


def _check_time(value: datetime) -> datetime:
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return check_time("time", value)


#: A cube in a path: 1 .. ``CUBE_ID_BYTES`` of valid UTF-8, not blank.
CubePath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=CUBE_ID_BYTES,
        description=f"The cube (at most {CUBE_ID_BYTES} bytes of UTF-8, not blank, no "
        "control character).",
    ),
    text_check(CUBE_ID_BYTES, blank=False, control=False),
]
#: A memory id in a path (memory ids are at most ``ID_BYTES``).
MemoryPath = Annotated[
    str, Path(min_length=1, max_length=ID_BYTES), text_check(ID_BYTES, blank=False)
]
#: A time in a query: ISO 8601, in the stores' range (naive is UTC).
QueryTime = Annotated[datetime, BeforeValidator(iso_time), AfterValidator(_check_time)]


# -- JSON body fields of exactly their documented type -------------------------------------------
# Pydantic's lax mode would take "5" or 5.0 for an integer and 1 or "yes" for a boolean: a body
# the schema forbids, accepted. In a JSON body a number is a number and a boolean a boolean.


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("a number is expected")
    return value


def _integer(value: Any) -> Any:
    """An integer, as JSON Schema counts them (``2.0`` is one; ``"2"`` and ``true`` are not)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("an integer is expected")
    return value


def json_int(**bounds: Any) -> Any:
    """An integer field of a JSON body with these bounds (``ge``, ``le``...), documented."""
    return Annotated[Annotated[int, Field(**bounds)], BeforeValidator(_integer)]


def json_float(**bounds: Any) -> Any:
    """A number field of a JSON body with these bounds, documented."""
    return Annotated[Annotated[float, Field(**bounds)], BeforeValidator(_number)]


JsonInt = json_int()
JsonFloat = json_float()
JsonBool = Annotated[bool, Strict()]

"""Chat with a cube's memory: ``POST /v1/cubes/{cube}/chat`` (SSE or JSON) and the
OpenAI-compatible ``POST /v1/chat/completions`` and ``GET /v1/models``.

The OpenAI endpoint takes the cube from the model name (``memstream/<cube>``) or from the
``X-Memstream-Cube`` header (then any model name is accepted, except ``memstream/<another>``).
Answers carry a ``memstream`` field (also on the last streamed chunk) with the memory ids in the
prompt, the prefix cache used, the adapter, timings and the interactions published; the
``X-Memstream-Memory-Ids`` header lists the retrieved memories. Errors are OpenAI's
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError, model_validator
from sse_starlette.sse import EventSourceResponse

from schemas.limits import (
    CHAT_MESSAGES,
    CHAT_PROMPT_BYTES,
    MODEL_NAME_BYTES,
    NAME_BYTES,
    SEED_MAX,
    STOP_BYTES,
    cut_utf8,
    utf8_size,
)
from streams.api.deps import Service, service
from streams.api.limits import ErrorBody, JsonBool, json_float, json_int
from streams.pipeline.chat import ChatError, ChatRequest, ChatResult, ChatService, Piece, Turn
from streams.pipeline.chat import chat_service as build_chat_service
from streams.transport.events import SessionId, Speaker, bounded, text_check

log = logging.getLogger("memstream.api")
router = APIRouter(tags=["chat"])
ServiceDep = Annotated[Service, Depends(service)]
MODEL_PREFIX = "memstream"
CUBE_HEADER = "X-Memstream-Cube"
CUBE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,255}$")
MAX_NEW_TOKENS = 2048
#: A message's text: valid Unicode; all of a turn's together at most CHAT_PROMPT_BYTES.
MessageText = Annotated[str, text_check(CHAT_PROMPT_BYTES)]
Stop = bounded(STOP_BYTES)
Seed = json_int(ge=-SEED_MAX, le=SEED_MAX)
TopK = json_int(ge=0, le=50)
Tokens = json_int(ge=1, le=MAX_NEW_TOKENS)
Temperature = json_float(ge=0.0, le=2.0)
TopP = json_float(gt=0.0, le=1.0)


def prompt_problem(texts: Iterable[str]) -> str | None:
    """Why a turn's messages are too long for the LM, or None."""
    size = sum(utf8_size(t) for t in texts)
    if size > CHAT_PROMPT_BYTES:
        return (f"the messages are {size} bytes in UTF-8 together, over the limit of "
                f"{CHAT_PROMPT_BYTES}")  # fmt: skip
    return None


def _shown(value: str, limit: int = 64) -> str:
    """``repr`` of a value a message names, cut to a readable length."""
    return repr(cut_utf8(value, limit)) + ("..." if len(value) > limit else "")


def chat_of(svc: Service) -> ChatService:
    """The process's chat service, made on first use (the LM itself loads on the first turn)."""
    found = getattr(svc, "_chat", None)
    if found is None:
        found = build_chat_service(svc.runtime, svc.producer)
        svc._chat = found  # type: ignore[attr-defined]
    return found


def chat_status(svc: Service) -> dict[str, Any]:
    """The chat part of ``/v1/status``: mode, model, whether the LM is loaded, counters."""
    found = getattr(svc, "_chat", None)
    if found is None:
        mode = "proxy" if svc.runtime.settings.llm_base_url else "local"
        return {"mode": mode, "lm": {"state": "not loaded"}, "turns": 0}
    return found.stats()


def _check_cube(cube_id: str) -> str:
    if not CUBE.match(cube_id):
        raise ChatError(
            f"{_shown(cube_id)} is not a cube name: letters, digits and . _ : @ - (at most 256, "
            "starting with a letter or digit)",
            400,
            "invalid_cube",
        )
    return cube_id


# -- memstream's own chat ------------------------------------------------------------------------


class MessageIn(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: MessageText


class ChatIn(BaseModel):
    """A turn: the conversation so far, ending with the user's message (or just ``message``).
    At most 256 messages, and 32 KiB of UTF-8 in all their texts together."""

    messages: list[MessageIn] = Field(
        default_factory=list,
        max_length=CHAT_MESSAGES,
        examples=[[{"role": "user", "content": "Where do I live now?"}]],
    )
    message: MessageText | None = Field(
        default=None, description="Appended as the last user message."
    )
    stream: JsonBool = True
    max_new_tokens: Tokens = 128
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    seed: Seed | None = None
    stop: list[Stop] = Field(default_factory=list, max_length=4)
    top_k: TopK = Field(default=5, description="Memories retrieved for the turn.")
    session_id: SessionId = "chat"
    user: Speaker = Field(default="user", description="The speaker of user messages.")
    publish: JsonBool = Field(default=True, description="Publish the turn back as interactions.")
    debug: JsonBool = Field(default=False, description="Include the whole prompt in the answer.")

    @model_validator(mode="after")
    def _prompt_fits(self) -> ChatIn:
        texts = [m.content for m in self.messages] + [self.message or ""]
        if (problem := prompt_problem(texts)) is not None:
            raise ValueError(problem)
        return self


class ChatErrorBody(BaseModel):
    """Why a chat turn was refused (4xx) or could not be answered (5xx)."""

    detail: str
    code: str | None = Field(
        default=None,
        description="The kind of refusal; absent where the body could not be read at all.",
    )


def _error_body(exc: ChatError) -> dict[str, Any]:
    return {"detail": str(exc), "code": exc.code}


_CHAT_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "``stream``: server-sent events ``token``, then ``done`` or ``error``; "
        "else the ``done`` object as JSON.",
        "content": {"text/event-stream": {}, "application/json": {}},
    },
    400: {"model": ChatErrorBody, "description": "A turn that cannot be answered as asked."},
    413: {"model": ErrorBody, "description": "The request body is over the limit."},
    502: {"model": ChatErrorBody, "description": "Proxy mode: the LLM endpoint failed."},
    503: {"model": ChatErrorBody, "description": "No views here, or the LM is not installed."},
}


@router.post("/v1/cubes/{cube_id}/chat", responses=_CHAT_ANSWERS)
async def chat(cube_id: str, body: ChatIn, svc: ServiceDep) -> Any:
    """Answer with the cube's memory. ``stream`` (default): server-sent events ``token``
    (``{"text"}``) then ``done`` (the memory ids used, the prefix cache, timings, the
    interactions published) or ``error``; ``stream=false``: the ``done`` object as JSON."""
    messages = [m.model_dump() for m in body.messages]
    if body.message is not None:
        messages.append({"role": "user", "content": body.message})
    service_ = chat_of(svc)
    try:
        request = ChatRequest(
            cube_id=_check_cube(cube_id), messages=tuple(messages),
            max_new_tokens=body.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
            seed=body.seed, stop=tuple(body.stop), top_k=body.top_k, session_id=body.session_id,
            user=body.user, publish=body.publish, debug=body.debug,
        )  # fmt: skip
        turn = await service_.prepare(request)
    except ChatError as exc:
        return JSONResponse(_error_body(exc), status_code=exc.status)
    headers = _headers(turn)
    if not body.stream:
        try:
            result = await _finish(service_, turn)
        except ChatError as exc:
            return JSONResponse(_error_body(exc), status_code=exc.status)
        return JSONResponse(result.as_dict(), headers=headers)

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            async for item in service_.stream(turn):
                if isinstance(item, Piece):
                    yield {"event": "token", "data": json.dumps({"text": item.text})}
                else:
                    yield {"event": "done", "data": json.dumps(item.as_dict())}
        except Exception as exc:
            yield {"event": "error", "data": json.dumps({"detail": _describe(exc)})}

    return EventSourceResponse(events(), headers=headers)


async def _finish(service_: ChatService, turn: Turn) -> ChatResult:
    try:
        async for item in service_.stream(turn):
            if isinstance(item, ChatResult):
                return item
    except ChatError:
        raise
    except Exception as exc:
        status = 503 if type(exc).__name__ == "ModelUnavailable" else 500
        raise ChatError(_describe(exc), status, "generation_failed") from exc
    raise ChatError("the turn ended without an answer", 500, "generation_failed")


def _describe(exc: BaseException) -> str:
    """What the caller is told: a :class:`ChatError`'s own reason; of anything else only its
    kind and an id to find it in the server's log (engine text never reaches the caller)."""
    if isinstance(exc, ChatError):
        return str(exc)
    incident = uuid.uuid4().hex[:12]
    log.error("chat turn failed (incident %s)", incident, exc_info=exc)
    return f"the turn failed ({type(exc).__name__}; incident {incident} in the server log)"


def _headers(turn: Turn) -> dict[str, str]:
    ids = ",".join(r["memory_id"] for r in turn.result.retrieved)
    return {"X-Memstream-Chat-Id": turn.result.chat_id, "X-Memstream-Memory-Ids": ids}


# -- OpenAI-compatible -----------------------------------------------------------------------------


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class OpenAIExtension(BaseModel):
    """``memstream`` in the request body (``extra_body={"memstream": {...}}``)."""

    top_k: TopK = 5
    session_id: SessionId = "chat"
    publish: JsonBool = True
    debug: JsonBool = False


class OpenAIMessage(BaseModel):
    role: bounded(32)  # type: ignore[valid-type]
    content: MessageText | list[dict[str, Any]] | None = None
    name: bounded(NAME_BYTES) | None = None  # type: ignore[valid-type]


class OpenAIChatIn(BaseModel):
    model: bounded(MODEL_NAME_BYTES) = Field(  # type: ignore[valid-type]
        description=f"'{MODEL_PREFIX}/<cube>', or any name with the {CUBE_HEADER} header.",
        examples=[f"{MODEL_PREFIX}/alice"],
    )
    messages: list[OpenAIMessage] = Field(
        max_length=CHAT_MESSAGES, examples=[[{"role": "user", "content": "Where do I live?"}]]
    )
    stream: JsonBool = False
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | list[Stop] | None = Field(default=None)
    n: json_int(ge=1) | None = None  # type: ignore[valid-type]
    user: Speaker | None = None
    stream_options: dict[str, Any] | None = None
    memstream: OpenAIExtension = Field(default_factory=OpenAIExtension)


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape."""

    error: OpenAIErrorDetail


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` written in place (for ``openapi_extra``)."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


_OPENAI_ERROR = {"model": OpenAIErrorBody}
_OPENAI_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A ``chat.completion``, or with ``stream`` its chunks as server-sent "
        "events ending with ``[DONE]``.",
        "content": {"application/json": {}, "text/event-stream": {}},
    },
    400: {**_OPENAI_ERROR, "description": "A request that cannot be answered as asked."},
    404: {**_OPENAI_ERROR, "description": "The model names no cube."},
    413: {"model": ErrorBody, "description": "The request body is over the limit."},
    502: {**_OPENAI_ERROR, "description": "Proxy mode: the LLM endpoint failed."},
    503: {**_OPENAI_ERROR, "description": "No views here, or the LM is not installed."},
}


def cube_of(model: str, header: str | None) -> str:
    """The cube a request names: ``memstream/<cube>`` or the header (see the module doc)."""
    named = None
    if model.startswith(f"{MODEL_PREFIX}/"):
        named = model[len(MODEL_PREFIX) + 1 :]
        if not CUBE.match(named):
            raise OpenAIError(
                400,
                f"model {_shown(model)}: {_shown(named)} is not a cube name (letters, digits and "
                ". _ : @ -, starting with a letter or digit, at most 256)",
                "invalid_model",
                "model",
            )
    if header is not None:
        header = header.strip()
        if not CUBE.match(header):
            raise OpenAIError(400, f"{CUBE_HEADER}: {_shown(header)} is not a cube name",
                              "invalid_cube")  # fmt: skip
        if named is not None and named != header:
            raise OpenAIError(400, f"model {_shown(model)} names cube {_shown(named)} but "
                              f"{CUBE_HEADER} says {_shown(header)}", "cube_conflict",
                              "model")  # fmt: skip
        return header
    if named is None:
        raise OpenAIError(
            404,
            f"the model {_shown(model)} does not exist: name a cube as '{MODEL_PREFIX}/<cube>' "
            f"(GET /v1/models lists them) or send the cube in the {CUBE_HEADER} header",
            "model_not_found",
            "model",
        )
    return named


def _messages(body: OpenAIChatIn) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ("system", "user", "assistant"):
            raise OpenAIError(400, f"messages[{i}]: role {_shown(m.role)} is not supported "
                              "(system, developer, user, assistant)", "invalid_role",
                              f"messages[{i}].role")  # fmt: skip
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type")
                    raise OpenAIError(400, f"messages[{i}]: only text content parts are "
                                      f"supported, not {_shown(str(kind))}",
                                      "invalid_content", f"messages[{i}].content")  # fmt: skip
                try:
                    utf8_size(part["text"])
                except ValueError as exc:
                    raise OpenAIError(400, f"messages[{i}]: {exc}", "invalid_content",
                                      f"messages[{i}].content") from exc  # fmt: skip
                parts.append(part["text"])
            content = "\n".join(parts)
        if content is None:
            raise OpenAIError(400, f"messages[{i}] has no content", "invalid_content",
                              f"messages[{i}].content")  # fmt: skip
        out.append({"role": role, "content": content})
    if (problem := prompt_problem(m["content"] for m in out)) is not None:
        raise OpenAIError(400, problem, "prompt_too_long", "messages")
    return out


def _chunk(result: ChatResult, created: int, model: str, delta: dict[str, Any],
           finish: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"id": result.chat_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}]}  # fmt: skip


def _usage(result: ChatResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}  # fmt: skip


def _extension(result: ChatResult) -> dict[str, Any]:
    body = result.as_dict()
    body.pop("answer")
    return body


@router.post(
    "/v1/chat/completions",
    responses=_OPENAI_ANSWERS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inline(OpenAIChatIn.model_json_schema())}},
        }
    },
)
async def chat_completions(request: Request, svc: ServiceDep) -> Any:
    """OpenAI's chat completions, answered with the cube's memory (see the module doc)."""
    try:
        try:
            raw = await request.json()
        except ValueError as exc:
            raise OpenAIError(400, f"the body is not JSON: {exc}", "invalid_json") from exc
        if not isinstance(raw, dict):
            raise OpenAIError(400, "the body must be a JSON object", "invalid_json")
        try:
            body = OpenAIChatIn.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"])
            raise OpenAIError(400, f"{param}: {first['msg']}", "invalid_request", param) from exc
        if body.n not in (None, 1):
            raise OpenAIError(400, "n: only one choice per request (n=1)", "invalid_n", "n")
        if not body.messages:
            raise OpenAIError(400, "messages is empty: send at least one user message",
                              "empty_messages", "messages")  # fmt: skip
        cube = cube_of(body.model, request.headers.get(CUBE_HEADER))
        messages = _messages(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        ext = body.memstream
        chat_request = ChatRequest(
            cube_id=cube, messages=tuple(messages),
            max_new_tokens=body.max_completion_tokens or body.max_tokens or 128,
            temperature=body.temperature or 0.0, top_p=body.top_p or 1.0, seed=body.seed,
            stop=tuple(stop[:4]), top_k=ext.top_k, session_id=ext.session_id,
            user=body.user or "user", publish=ext.publish, debug=ext.debug,
        )  # fmt: skip
        service_ = chat_of(svc)
        try:
            turn = await service_.prepare(chat_request)
        except ChatError as exc:
            raise OpenAIError(exc.status, str(exc), exc.code, "messages") from exc
        except HTTPException as exc:
            raise OpenAIError(exc.status_code, str(exc.detail), "unavailable") from exc
    except OpenAIError as exc:
        return exc.response()
    model = body.model if body.model.startswith(f"{MODEL_PREFIX}/") else f"{MODEL_PREFIX}/{cube}"
    created = int(time.time())
    headers = _headers(turn)
    if not body.stream:
        try:
            result = await _finish(service_, turn)
        except ChatError as exc:
            return OpenAIError(exc.status, str(exc), exc.code).response()
        answer = {
            "id": result.chat_id, "object": "chat.completion", "created": created,
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.answer},
                         "logprobs": None, "finish_reason": result.finish_reason}],
            "usage": _usage(result), "memstream": _extension(result),
        }  # fmt: skip
        return JSONResponse(answer, headers=headers)
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    async def chunks() -> AsyncIterator[str]:
        result = turn.result
        yield json.dumps(_chunk(result, created, model, {"role": "assistant", "content": ""}))
        try:
            async for item in service_.stream(turn):
                if isinstance(item, Piece):
                    if item.text:
                        yield json.dumps(_chunk(result, created, model, {"content": item.text}))
                    continue
                last = _chunk(item, created, model, {}, item.finish_reason)
                last["memstream"] = _extension(item)
                yield json.dumps(last)
                if include_usage:
                    yield json.dumps({**_chunk(item, created, model, {}), "choices": [],
                                      "usage": _usage(item)})  # fmt: skip
        except Exception as exc:
            code = exc.code if isinstance(exc, ChatError) else "generation_failed"
            error = {"message": _describe(exc), "type": "server_error", "param": None,
                     "code": code}  # fmt: skip
            yield json.dumps({"error": error})
        yield "[DONE]"

    return EventSourceResponse(chunks(), headers=headers)


@router.get("/v1/models")
async def models(svc: ServiceDep) -> dict[str, Any]:
    """The cubes this process folds, as OpenAI models ``memstream/<cube>``, and ``memstream``
    itself (the cube then comes in the X-Memstream-Cube header). Any valid cube name may be
    used: a cube with no memories yet starts with its first chat."""
    context = chat_of(svc).context
    cubes = context.cubes() if hasattr(context, "cubes") else []
    now = int(time.time())
    entry = {"object": "model", "created": now, "owned_by": "memstream"}
    data = [{"id": MODEL_PREFIX, **entry}, *({"id": f"{MODEL_PREFIX}/{c}", **entry} for c in cubes)]
    return {"object": "list", "data": data}


@router.get(
    "/v1/models/{model:path}",
    responses={
        400: {**_OPENAI_ERROR, "description": "The model names no valid cube."},
        # A name the path does not match at all (a line break) is the router's plain 404.
        404: {"model": OpenAIErrorBody | ErrorBody, "description": "No such model."},
    },
)
async def model(
    model: Annotated[str, Path(examples=[f"{MODEL_PREFIX}/alice", MODEL_PREFIX])], svc: ServiceDep
) -> Any:
    """One model: ``memstream`` or ``memstream/<cube>`` (any valid cube name)."""
    try:
        if model != MODEL_PREFIX:
            cube_of(model, None)
    except OpenAIError as exc:
        return exc.response()
    return {"id": model, "object": "model", "created": int(time.time()), "owned_by": "memstream"}

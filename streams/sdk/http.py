"""The sync SDK's HTTP: urllib3's pool of keep-alive connections, JSON in and out, and errors
that say why.

Why urllib3 and not httpx (which :class:`~streams.sdk.client.AsyncMemoryClient` uses): a call
through httpx's sync client took 0.6-1.2 ms more than through urllib3 against the same local
server on a 2-core VM, and a search through the SDK 0.3-0.9 ms more against the same worker
(its request and response models, built per call; an httpx transport backed by urllib3 saved
nothing). A memory search answers in about 10 ms, and on two cores the client's CPU is also
taken from the server's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlencode

import orjson
import urllib3


class APIError(RuntimeError):
    """The API answered with an error status: ``status_code`` and its ``detail`` say which and why
    (400: a refused request, 404: no such memory or cube, 422: an invalid field)."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class APIUnavailable(ConnectionError):
    """No answer from the API: it is not running at that address, or the connection failed."""


def detail_of(body: bytes) -> str:
    """The reason an error answer gives: FastAPI's ``detail``, else the start of the body."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:500].decode(errors="replace")
    detail = parsed.get("detail", parsed) if isinstance(parsed, dict) else parsed
    return detail if isinstance(detail, str) else orjson.dumps(detail).decode()[:500]


class Http:
    """JSON calls to one memstream API; thread-safe (urllib3 pools its connections)."""

    def __init__(self, base_url: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        limits = urllib3.Timeout(connect=min(timeout, 10), read=timeout)
        self._pool = urllib3.PoolManager(maxsize=8, retries=False, timeout=limits)

    def _send(self, method: str, path: str, params: dict[str, Any] | None, body: Any,
              stream: bool = False) -> urllib3.BaseHTTPResponse:  # fmt: skip
        url = self.base_url + path
        if params:  # as httpx encodes them: booleans in lower case
            query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()}
            url += "?" + urlencode(query, doseq=True)
        headers = {"accept": "application/json"}
        payload = None
        if body is not None:
            payload = orjson.dumps(body)
            headers["content-type"] = "application/json"
        try:
            if stream:  # a streamed answer waits on the LM between events: no read timeout
                endless = urllib3.Timeout(connect=10, read=None)
                return self._pool.request(method, url, body=payload, headers=headers,
                                          preload_content=False, timeout=endless)  # fmt: skip
            return self._pool.request(method, url, body=payload, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            raise APIUnavailable(f"memstream API at {self.base_url}: {exc}") from exc

    def status(self, method: str, path: str, params: dict[str, Any] | None = None) -> int:
        """The status code of a call (its body ignored)."""
        return self._send(method, path, params, None).status

    def json(self, method: str, path: str, params: dict[str, Any] | None = None,
             body: Any = None) -> Any:  # fmt: skip
        """The decoded answer of a call; :class:`APIError` for a 4xx/5xx."""
        response = self._send(method, path, params, body)
        if response.status >= 400:
            raise APIError(response.status, detail_of(response.data))
        return orjson.loads(response.data)

    @contextmanager
    def lines(self, method: str, path: str, body: Any) -> Iterator[Iterator[str]]:
        """The lines of a streamed answer as they arrive (server-sent events), with no read
        timeout; :class:`APIError` for a 4xx/5xx. The connection goes back to the pool after."""
        response = self._send(method, path, None, body, stream=True)
        try:
            if response.status >= 400:
                raise APIError(response.status, detail_of(response.read()))
            yield (line.decode().rstrip("\r\n") for line in response)
        finally:
            response.release_conn()

    def close(self) -> None:
        self._pool.clear()

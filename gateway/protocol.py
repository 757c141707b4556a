"""uvicorn's httptools protocol with bounds on what a client may send before the app sees it.

uvicorn bounds neither the size of a request's head with httptools (``h11_max_incomplete_event_size``
applies to the h11 parser only, which costs several times more CPU per request) nor the time a client
takes to send it: its keep-alive timer runs only between requests, and any byte resets it, so a
client sending a header a byte at a time holds a connection for ever. This subclass adds:

- **head size**: the request line and headers together may take ``max_header_bytes``; one byte more
  and the client gets 431 in the gateway's error shape and the connection is closed (nothing more of
  it is read);
- **head time**: from the moment a connection is open or a response was sent, the next request's
  head must be complete within ``header_timeout_seconds``; otherwise a client that sent part of one
  gets 408 and one that sent nothing is disconnected (uvicorn's own keep-alive timeout usually closes
  an idle connection first).

Body size and time are the app's to check (it knows each route's limit and reads the body itself).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import transcode


def error_response(http_status: int, reason_phrase: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {http_status} {reason_phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def _refusal(http_status: int, reason_phrase: str, message: str, reason: str) -> bytes:
    import grpc

    from . import jsonmap

    status = transcode.simple_status(grpc.StatusCode.INVALID_ARGUMENT, message, reason)
    body = transcode.error_body(status)
    body["error"]["code"] = http_status
    return error_response(http_status, reason_phrase, jsonmap.dumps(body))


class _TooLarge(Exception):
    pass


class GuardedProtocol(HttpToolsProtocol):
    """Set ``max_header_bytes`` and ``header_timeout`` on the class (``guarded`` makes one)."""

    max_header_bytes = 16384
    header_timeout = 10.0
    _too_large: bytes = b""
    _too_slow: bytes = b""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._head_started = False
        self._head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_bytes = 0
        self._head_started = False
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_started:
            self.transport.write(self._too_slow)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_started = True
        try:
            super().data_received(data)
        except _TooLarge:  # pragma: no cover - httptools wraps callback errors; kept for safety
            self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self.max_header_bytes:
            self._refuse_head()
            return
        super().send_400_response(msg)

    def _refuse_head(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(self._too_large)
            self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        if self._head_timer is None:  # a pipelined request: its head has its own time
            self._arm()
            self._head_started = True

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_header_bytes:
            raise _TooLarge  # httptools stops parsing; data_received answers (send_400_response)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()


def guarded(max_header_bytes: int, header_timeout: float) -> type[GuardedProtocol]:
    """A protocol class with these bounds (uvicorn takes a class, and builds one per connection)."""
    return type(
        "BoundedHttpToolsProtocol",
        (GuardedProtocol,),
        {
            "max_header_bytes": max_header_bytes,
            "header_timeout": header_timeout,
            "_too_large": _refusal(
                431,
                "Request Header Fields Too Large",
                f"the request line and headers are larger than {max_header_bytes} bytes",
                "HEADERS_TOO_LARGE",
            ),
            "_too_slow": _refusal(
                408, "Request Timeout", "the request's headers did not arrive in time", "REQUEST_TIMEOUT"
            ),
        },
    )


__all__ = ["GuardedProtocol", "guarded", "httptools"]

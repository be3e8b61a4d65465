"""Requests refused before they are read: headers or bodies over the size limits, and bodies BentoML cannot parse."""

from __future__ import annotations

import orjson
from starlette.requests import Request

from serving.inputs import ClientError, check_one_value_per_field

HEADER_OVERHEAD = 4  # ": " and CRLF around each header as it came over the wire


class HeaderLimit:
    """ASGI middleware for every route: a request whose request line and headers together pass `max_bytes` gets
    a 431 naming the limit, and its body is never read. The HTTP parser under `bentoml serve` has held the
    headers by then: a proxy in front limits them as they arrive (docs/serving.md, "Exposing the service")."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = len(scope["method"]) + len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
            size += sum(len(name) + len(value) + HEADER_OVERHEAD for name, value in scope.get("headers") or [])
            if size > self.max_bytes:
                message = f"request headers too large: {size:,} bytes; the limit is {self.max_bytes:,} bytes"
                return await reject(send, ClientError(message, status=431))
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets a 413 naming the limit. A Content-Length over it is
    refused before anything is read; a chunked body is counted as it arrives and refused when it passes."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and not length.isdigit():
            return await reject(send, ClientError(f"invalid Content-Length {length.decode('latin-1')!r}"))
        if length is not None and int(length) > self.max_bytes:
            return await reject(
                send,
                ClientError(
                    f"request body too large: the limit is {self.max_bytes:,} bytes, got {int(length):,} bytes",
                    status=413,
                ),
            )
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise ClientError(f"request body too large: the limit is {self.max_bytes:,} bytes", status=413)
            return message

        return await self.app(scope, counted_receive, send)


async def reject(send, error: ClientError) -> None:
    """Answer with the error and close the connection: the rest of the body is not read."""
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": orjson.dumps({"error": error.message})})


class ApiRequestGuard:
    """ASGI middleware for BentoML's API routes, whose own request parsing answers 500 to a body that is not
    what its content type says: a POST to one of `routes` ({path: media type}) with another content type,
    multipart without a boundary, a multipart body that does not parse, or a body over `max_bytes`, gets a
    4xx naming the problem. A good body is handed on as it came."""

    def __init__(self, app, routes: dict[str, str], max_bytes: int):
        self.app = app
        self.routes = routes
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        expected = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if expected is None or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        media, _, parameters = content_type.partition(";")
        multipart = expected.startswith("multipart/")
        if media.strip().lower() != expected or (multipart and "boundary=" not in parameters):
            wanted = f"{expected} with a boundary" if multipart else expected
            return await reject(send, ClientError(f"send {wanted} (got content type {content_type or 'none'!r})"))
        if not multipart:
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                limit = f"request body too large: the limit is {self.max_bytes:,} bytes"
                return await reject(send, ClientError(limit, status=413))
            if not message.get("more_body"):
                break
        data = bytes(body)
        try:
            async with Request(scope, replaying(data, receive)).form() as form:
                check_one_value_per_field([name for name, _ in form.multi_items()])
        except ClientError as exc:
            return await reject(send, exc)
        except Exception as exc:  # the multipart parser's errors are the client's malformed body
            return await reject(send, ClientError(f"malformed multipart body: {exc}"))
        return await self.app(scope, replaying(data, receive), send)


def replaying(body: bytes, receive):
    """An ASGI receive that gives `body` first, then what `receive` gives (a disconnect)."""
    given = False

    async def replay():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay

"""The request body limit, enforced before a body is read into memory."""

from __future__ import annotations

import orjson

from serving.inputs import ClientError


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

"""Request checks that must happen before BentoML parses a request (its parse errors are 500s)."""
from __future__ import annotations

import json

from starlette.datastructures import UploadFile
from starlette.requests import Request


class RequestGuard:
    """ASGI middleware: a POST body over `max_bytes` gets a 400 naming the limit (with a Content-Length
    or chunked), and a multipart upload must carry exactly the file fields its route expects."""

    def __init__(self, app, max_bytes: int, file_fields: dict[str, str], buffered: tuple[str, ...]):
        self.app = app
        self.max_bytes = max_bytes
        self.file_fields = file_fields  # route path -> the one multipart file field it takes
        self.buffered = buffered  # public routes whose bodies are counted as they arrive

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            size = f"{int(length):,} bytes" if length.isdigit() else "an invalid Content-Length"
            return await _reject(send, f"request body too large: the limit is {self.max_bytes:,} bytes, got {size}")
        if scope["path"] not in self.buffered:
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:  # buffer the body (at most max_bytes) so its real size is known
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _reject(send, f"request body too large: the limit is {self.max_bytes:,} bytes")
            messages.append(message)
            if not message.get("more_body"):
                break
        field = self.file_fields.get(scope["path"])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if field and content_type.startswith("multipart/form-data"):
            problem = await _multipart_problem(scope, list(messages), field)
            if problem:
                return await _reject(send, problem)

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


async def _multipart_problem(scope, messages: list, field: str) -> str | None:
    async def receive():
        return messages.pop(0) if messages else {"type": "http.request", "body": b"", "more_body": False}

    try:
        async with Request(scope, receive).form(max_files=2, max_fields=10) as form:
            names = list(form.keys())
            if field not in names:
                return f"missing multipart field `{field}` (got {names or 'no fields'}): send the image file as `{field}`"
            extra = [name for name in names if name != field]
            if extra:
                return f"unexpected multipart fields {extra}: send only the image file, as `{field}`"
            if not isinstance(form[field], UploadFile):
                return f"multipart field `{field}` must be a file upload, not a text value"
    except Exception as exc:  # the parser's errors are the client's malformed body
        return f"malformed multipart body: {exc}"
    return None


async def _reject(send, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

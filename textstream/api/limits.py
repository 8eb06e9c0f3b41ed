"""The request body's size limit (MAX_BODY_BYTES), and its encoding, as ASGI
middleware.

A body over the limit is answered 413 before the app sees it: by its
Content-Length when it sends one, else by counting while reading (a chunked
upload is buffered up to the limit, then replayed to the app). This bounds what a
client can make the API read and parse; the limit grows past MAX_BODY_BYTES to
hold the longest prompt the API takes (`prompt_chars`: submit.prompt_char_limit,
which grows with the largest context window served) at 6 bytes a character, a
`\\uXXXX` escape's size, and 64 KiB for the rest of the body, so a prompt that
fits its model is never refused here.

A body the JSON parser must not read is refused here too: one that is not UTF-8
(422; Python's JSON parser would read UTF-16 or UTF-32 as well), or sent as
something other than JSON or with no Content-Type at all (415: a browser's
cross-site "simple" request may carry a body, never a JSON type). The caller was
settled before (edge.py: a caller without a key got its 401 without a byte of
its body read), and its rate count is taken back. Path and query values that are
not UTF-8 are refused at the edge, with the same check (`undecodable`).
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textstream.api.errors import error_response, refund, refusal_body

#: Set in a request's scope when the server answered it 408 (server.py): what the
#: app then sends goes nowhere, and the request log says 408, as the client saw.
READ_TIMED_OUT = "textstream.read_timed_out"


def undecodable(scope: Scope) -> str | None:
    """The name of the first path or query part that is not UTF-8, or None: the
    server's own decoding would have made it U+FFFD, so a stop string or a model
    name of "\ufffd" would have been queued."""
    raw_path = scope.get("raw_path") or scope["path"].encode()
    if not _utf8(unquote_to_bytes(raw_path)):
        return "question" if scope["path"].startswith("/completion/") else "path"
    for pair in scope.get("query_string", b"").split(b"&"):
        name, _, value = pair.partition(b"=")
        name, value = (unquote_to_bytes(part.replace(b"+", b" ")) for part in (name, value))
        if not _utf8(name):
            return "query"
        if not _utf8(value):
            return name.decode()
    return None


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _body_refusal(body: bytes, content_type: bytes | None) -> tuple[int, str, str] | None:
    if not body:
        return None
    if content_type is None or not _json_media_type(content_type):
        why = "the body must be JSON: send Content-Type: application/json"
        return 415, "unsupported_media_type", why
    if b"\x00" in body or not _utf8(body):  # a NUL byte: UTF-16 or UTF-32
        return 422, "invalid_request", "the request body must be JSON in UTF-8"
    return None


def _json_media_type(value: bytes) -> bool:
    """Whether a Content-Type names JSON in UTF-8 (no charset, or utf-8)."""
    media, *params = (part.strip().lower() for part in value.decode("latin-1").split(";"))
    charsets = [p.partition("=")[2].strip('"') for p in params if p.startswith("charset=")]
    is_json = media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )
    return is_json and all(c in ("utf-8", "utf8") for c in charsets)


#: The most bytes one prompt character takes in a JSON body: a `\uXXXX` escape
#: (clients that write JSON as ASCII, Python's json.dumps by default).
JSON_BYTES_PER_CHAR = 6
#: Room for the rest of such a body: the fields around the prompt, a chat's
#: message objects.
BODY_HEADROOM = 1 << 16


class BodyLimit:
    def __init__(
        self, app: ASGIApp, max_bytes: int, prompt_chars: Callable[[], int] = lambda: 0
    ) -> None:
        self.app = app
        self._max_bytes = max_bytes
        self._prompt_chars = prompt_chars

    @property
    def max_bytes(self) -> int:
        prompt_chars = self._prompt_chars()
        if not prompt_chars:
            return self._max_bytes
        return max(self._max_bytes, JSON_BYTES_PER_CHAR * prompt_chars + BODY_HEADROOM)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        max_bytes = self.max_bytes
        if declared.isdigit() and int(declared) > max_bytes:
            await self._refuse(scope, send, max_bytes)
            return
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > max_bytes:
                await self._refuse(scope, send, max_bytes)
                return
            if not message.get("more_body", False):
                break

        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        refusal = _body_refusal(body, headers.get(b"content-type"))
        if refusal is not None:
            request = Request(scope)
            await refund(request)  # counted at the edge (edge.py), which ran first
            status, error_type, why = refusal
            response = error_response(request, status, error_type, why, "body")
            await response(scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, max_bytes: int) -> None:
        message = f"the request body is over the {max_bytes}-byte limit (MAX_BODY_BYTES)"
        body = refusal_body(scope["path"], "body_too_large", message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

"""Security headers on every answer of the app: one ASGI middleware, outermost, so
that refusals made by other middleware carry them too.

The page at `/` holds an API key and draws untrusted model output, so it gets a
Content-Security-Policy with no inline script and no inline style (its script and
styles are files under /static), may not be framed by any site (`frame-ancestors
'none'`, and `X-Frame-Options: DENY` for browsers that predate it), and may only
talk to this origin. /docs and /redoc are FastAPI's own pages: Swagger UI's one
inline script is allowed by its hash, computed here from the same FastAPI function
that writes it (operator.add_docs), and both need inline styles (ReDoc writes
<style> elements). Everything else (JSON, event streams, assets) gets a policy that
allows nothing, since none of it is meant to run as a page.

`Referrer-Policy: same-origin`, not `no-referrer`: links out of an answer still send
no referrer, but under `no-referrer` the Fetch standard's origin serialization makes
a same-origin POST carry `Origin: null` (Chromium 156 sends the origin anyway), which
an origin check cannot tell from a sandboxed frame's.
"""

from __future__ import annotations

import base64
import hashlib
import re

from fastapi.openapi.docs import get_swagger_ui_html
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPENAPI_URL = "/openapi.json"  # as operator.add_docs serves it


def inline_script_hashes(html: str) -> list[str]:
    """CSP sources for each inline <script> of `html`, by its SHA-256."""
    hashes = []
    for body in re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL):
        digest = hashlib.sha256(body.encode()).digest()
        hashes.append(f"'sha256-{base64.b64encode(digest).decode()}'")
    return hashes


def swagger_script_hashes() -> str:
    """The inline script depends on the schema's URL only (the other arguments
    are outside it)."""
    html = get_swagger_ui_html(
        openapi_url=OPENAPI_URL, title="", swagger_js_url="", swagger_css_url=""
    )
    return " ".join(inline_script_hashes(bytes(html.body).decode()))


def policy(**directives: str) -> str:
    base = {"default-src": "'none'", "base-uri": "'none'", "form-action": "'none'"}
    base |= {name.replace("_", "-"): value for name, value in directives.items()}
    base["frame-ancestors"] = "'none'"
    return "; ".join(f"{name} {value}" for name, value in base.items())


PAGE_POLICY = policy(
    script_src="'self'",
    style_src="'self'",
    img_src="'self' data:",  # the page's empty favicon is `data:,`
    connect_src="'self'",
)
DOCS_POLICY = policy(
    script_src=f"'self' {swagger_script_hashes()}",
    style_src="'self' 'unsafe-inline'",
    img_src="'self' data:",
    connect_src="'self'",
    worker_src="'self' blob:",  # ReDoc's search runs in a worker made from a blob
)
NOTHING_POLICY = policy()

POLICIES = {"/": PAGE_POLICY, "/docs": DOCS_POLICY, "/redoc": DOCS_POLICY}


class SecurityHeaders:
    """Adds the headers above to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = POLICIES.get(path, NOTHING_POLICY)
                headers["X-Frame-Options"] = "DENY"
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "same-origin"
                # OpenAI's x-ratelimit-* (edge.rate_headers), in the request's state.
                for name, value in scope.get("state", {}).get("ratelimit_headers", {}).items():
                    headers[name] = value
                if path.startswith("/static/") and "cache-control" not in headers:
                    # Asked again on each load (a 304 by ETag): an upgraded page
                    # never runs with the script of the version before.
                    headers["Cache-Control"] = "no-cache"
            await send(message)

        await self.app(scope, receive, send_with_headers)

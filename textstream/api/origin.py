"""Same-origin by default, as ASGI middleware: who may reach the API from a browser.

- **Host** (ALLOWED_HOSTS; Starlette's TrustedHostMiddleware, Django's ALLOWED_HOSTS).
  Empty (the default) means: a request that arrived on a loopback address must
  name a local host (`localhost`, `*.localhost`, `127.x.x.x`, `[::1]`); any other
  is answered 400 before the app sees it. That is DNS rebinding's way in: a page
  on attacker.example, whose name now resolves to 127.0.0.1, reaching a
  textstream on the user's machine, with `Host: attacker.example`. A request that
  arrived on another address is not checked unless ALLOWED_HOSTS lists names.
  Behind a proxy on the same host, list the public names the proxy forwards.
  /health and /ready answer any Host: probes name the server by its address.
- **Origin** (CORS_ORIGINS). A browser request that would start or stop work
  (any method but GET/HEAD/OPTIONS, and `GET /completion/…`) from another origin
  is answered 403 before anything is written, unless CORS_ORIGINS allows that
  origin. CORS alone does not stop it: a "simple" cross-site request (a `no-cors`
  fetch, a form post, an `<img src>`) is sent and run; only its answer is hidden.
  The origin is read from `Origin`, or, for requests that send none (a no-cors
  GET), from `Sec-Fetch-Site`. Clients that are not browsers send neither, and
  pass.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from textstream.api.errors import error_response

#: Names a request on a loopback address may give in its Host (besides 127.x.x.x).
LOCAL_NAMES = ("localhost", "::1")
#: Probes (a load balancer's, Kubernetes') name the server by its address, which
#: ALLOWED_HOSTS need not list: these answer whatever the Host.
PROBES = ("/health", "/ready")


def _is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 on a dual-stack socket
    return ip.is_loopback


def host_name(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _name_matches(name: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) or name == pattern[2:]
    return name == pattern


def host_allowed(name: str, allowed: list[str], on_loopback: bool) -> bool:
    if allowed:
        return any(_name_matches(name, pattern.lower().strip("[]")) for pattern in allowed)
    if not on_loopback:
        return True
    return name in LOCAL_NAMES or name.endswith(".localhost") or _is_loopback(name)


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin names this server as the request's Host does. The
    scheme is not compared: behind a TLS-terminating proxy the server sees http
    while the page is https. A Host without a port was reached on a default one."""
    try:
        page, here = urlsplit(origin), urlsplit(f"//{host}")
        if page.hostname is None or page.hostname != here.hostname:
            return False
        default = {"http": 80, "https": 443}.get(page.scheme)
        port = page.port or default
        return port in (80, 443) if here.port is None else port == here.port
    except ValueError:  # a malformed port
        return False


def starts_work(scope: Scope) -> bool:
    method, path = scope["method"], scope["path"]
    return method not in ("GET", "HEAD", "OPTIONS") or path.startswith("/completion/")


class SameOrigin:
    def __init__(self, app: ASGIApp, allowed_hosts: list[str], cors_origins: list[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.cors_origins = cors_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self.refusal(request)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, error_type, message = refusal
        response = error_response(request, status, error_type, message, None)
        response.headers["Connection"] = "close"  # a body may follow, unread
        await response(scope, receive, send)

    def refusal(self, request: Request) -> tuple[int, str, str] | None:
        host = request.headers.get("host", "")
        server = request.scope.get("server") or ("", 0)
        if (
            host
            and request.url.path not in PROBES
            and not host_allowed(host_name(host), self.allowed_hosts, _is_loopback(server[0]))
        ):
            why = "this server does not answer to that Host name (ALLOWED_HOSTS)"
            return 400, "invalid_host", why
        if not starts_work(request.scope) or self.origin_allowed(request):
            return None
        why = "cross-origin requests are refused unless CORS_ORIGINS allows the origin"
        return 403, "forbidden_origin", why

    def origin_allowed(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            # No Origin (a no-cors GET): the browser's own word on where it came from.
            return request.headers.get("sec-fetch-site", "") not in ("cross-site", "same-site")
        if origin in self.cors_origins or "*" in self.cors_origins:
            return True
        host = request.headers.get("host", "")
        return origin != "null" and same_origin(origin, host)

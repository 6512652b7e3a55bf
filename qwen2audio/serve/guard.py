"""security: requests a browser makes on behalf of another web site.

A page on any site can make the visitor's browser send requests to http://127.0.0.1:8000. Two rules stop that:
- Host: a server bound to a loopback address answers only requests addressed to localhost, 127.0.0.1 or [::1]; a
  site that re-points its own name at 127.0.0.1 (DNS rebinding) sends its own name as Host and is refused.
- Origin: browsers send it with cross-site requests (and with same-origin POSTs); when present it must be this
  server's own origin (Host), so only pages this server serves itself (issue 14's page at `/`) can talk to it, and
  no CORS header is ever sent. Clients that are not browsers (curl, the openai package) send no Origin.
"""

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _host_name(host: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    return (urlsplit(f"//{host}").hostname or "") if host else ""


class Guard:
    """ASGI middleware applying the two rules above to every HTTP request, every route included."""

    def __init__(self, app: ASGIApp, loopback_only: bool) -> None:
        self.app, self.loopback_only = app, loopback_only

    def problem(self, headers: Headers) -> str | None:
        host = headers.get("host", "")
        if self.loopback_only and _host_name(host) not in LOOPBACK_NAMES:
            return "this server answers only requests addressed to localhost (started with a loopback --host)"
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return "cross-origin requests are refused: only pages served by this server may call it"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        problem = self.problem(Headers(scope=scope)) if scope["type"] == "http" else None
        if problem is not None:
            error = APIError(403, problem, None, "forbidden")
            await JSONResponse(error.body(), error.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)

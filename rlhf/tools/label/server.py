"""The labelling web server: one HTML page and a small JSON API over a Queue (Starlette).

Every request must carry the session's random token (`?token=` or the X-Token header), else
403: the page's URL, printed at start, holds it. The page is served with a Content-Security
Policy that runs only its own script (a per-response nonce), on top of rendering answers as
text, so a model that writes `<script>` shows the tag and runs nothing.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Any

from rlhf.infra.errors import UserError
from rlhf.tools.label.store import Queue

PAGE = Path(__file__).with_name("page.html")
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def require_starlette() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"rlhf label needs the 'label' extra ({e.name} is missing): pip install 'rlhf[label]'"
        ) from None


class TokenGate:
    """ASGI middleware: 403 for any HTTP request without the right token."""

    def __init__(self, app: Any, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not secrets.compare_digest(given_token(scope), self.token):
            from starlette.responses import PlainTextResponse

            response = PlainTextResponse("403: missing or wrong token", 403, headers=HEADERS)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def given_token(scope: dict) -> str:
    from urllib.parse import parse_qs

    for name, value in scope.get("headers", []):
        if name == b"x-token":
            return value.decode("latin-1")
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return query.get("token", [""])[0]


def build_app(queue: Queue, token: str) -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Route

    api = Api(queue)
    routes = [
        Route("/", api.page),
        Route("/api/next", api.next),
        Route("/api/rank", api.rank, methods=["POST"]),
        Route("/api/skip", api.skip, methods=["POST"]),
        Route("/api/unskip", api.unskip, methods=["POST"]),
        Route("/api/revisit", api.revisit, methods=["POST"]),
    ]
    return TokenGate(Starlette(routes=routes), token)


class Api:
    """The endpoints; plain functions run in Starlette's thread pool, the Queue locks. A
    ranking is written (and fsync'd) in the thread pool too."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def page(self, request: Any) -> Any:
        from starlette.responses import HTMLResponse

        nonce = secrets.token_urlsafe(16)
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'"
        )
        html = PAGE.read_text(encoding="utf-8").replace("{{NONCE}}", nonce)
        return HTMLResponse(html, headers={**HEADERS, "Content-Security-Policy": csp})

    def state(self, i: int | None) -> dict[str, Any]:
        item = None
        if i is not None:
            it = self.queue.items[i]
            item = {"id": i, "prompt": it.prompt, "responses": it.responses}
            item["finished"] = it.finished
        return {"item": item, "progress": self.queue.progress()}

    def next(self, request: Any) -> Any:
        tab = request.query_params.get("tab", "")
        return json_response(self.state(self.queue.next(tab)))

    async def rank(self, request: Any) -> Any:
        from starlette.concurrency import run_in_threadpool

        from rlhf.data.validate import InvalidRow

        body, i = await self.body_and_item(request)
        if i is None:
            return json_response({"error": "no such item"}, 400)
        try:
            seconds = float(body.get("seconds", 0))
            args = (i, body.get("ranking"), bool(body.get("all_bad")), seconds)
            written = await run_in_threadpool(self.queue.rank, *args)
        except (InvalidRow, TypeError, ValueError) as e:
            return json_response({"error": str(e)}, 400)
        if not written:
            return json_response({"error": "already ranked", **self.state(None)}, 409)
        return json_response({"ok": True, **self.state(None)})

    async def skip(self, request: Any) -> Any:
        _, i = await self.body_and_item(request)
        if i is not None:
            self.queue.skip(i)  # memory only: no file to wait for
        return json_response(self.state(None))

    async def unskip(self, request: Any) -> Any:
        _, i = await self.body_and_item(request)
        if i is None:
            return json_response({"error": "no such item"}, 400)
        self.queue.unskip(i)
        return json_response(self.state(i))

    def revisit(self, request: Any) -> Any:
        self.queue.revisit()
        return json_response(self.state(None))

    async def body_and_item(self, request: Any) -> tuple[dict, int | None]:
        try:
            body = await request.json()
        except ValueError:
            return {}, None
        i = body.get("id") if isinstance(body, dict) else None
        ok = isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(self.queue.items)
        return (body if isinstance(body, dict) else {}), (i if ok else None)


def json_response(content: dict, status: int = 200) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(content, status, headers=HEADERS)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or one line saying why not (port in use, unknown host)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(64)
    return sock


def url(sock: socket.socket, host: str, token: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def serve(app: Any, sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])

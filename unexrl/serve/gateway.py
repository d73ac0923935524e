"""What stands between a client and the service's API (docs/security.md): ASGI middleware around BentoML's app.

In the order a request meets them:
- ``ClientErrors``: every 4xx, whatever the route and method, gets one JSON body shape (``ErrorBody``, the schema
  the OpenAPI document declares) and one log line; BentoML's own bodies differ by error kind (a 405 is plain
  text), and it logs a traceback for each;
- ``Gate``: the bearer token on the API routes (401); on every POST, JSON only (415) and a bounded body (413,
  counted as it arrives whatever Content-Length claims; the app gets the body only when whole and in bounds);
- ``/docs.json`` completed with the bearer scheme and the statuses the gate answers.

/livez, /readyz, /metrics, /docs and /version need no token: the NetworkPolicy admits only Prometheus and the
gateway to the port (k8s/base/serving/networkpolicy.yaml).

The token: ``UNEXRL_API_TOKEN`` (in Kubernetes from a Secret, ``secretKeyRef``) or the file named by
``UNEXRL_API_TOKEN_FILE``; with neither, the embedded default generates one into ``<BENTOML_HOME>/api-token``
(mode 0600) and logs that path.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from unexrl.serve.api import MAX_BODY_BYTES, ErrorBody

log = logging.getLogger(__name__)

ENV_TOKEN = "UNEXRL_API_TOKEN"
ENV_TOKEN_FILE = "UNEXRL_API_TOKEN_FILE"
TOKEN_FILE = "api-token"
MIN_TOKEN_CHARS = 32
API_ROUTES = frozenset({"/recommend", "/feedback"})
"""the routes that need the token; every other route is a probe, the metrics or the documents"""

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class TokenError(ValueError):
    """The configured API token is unusable (empty, too short, or its file unreadable)."""


def api_token(environ: Mapping[str, str], home: Path) -> str:
    """The token clients must send, from the environment, its file, or (neither set) a generated local file."""
    if environ.get(ENV_TOKEN):
        return _checked(environ[ENV_TOKEN], ENV_TOKEN)
    if environ.get(ENV_TOKEN_FILE):
        path = Path(environ[ENV_TOKEN_FILE])
        try:
            return _checked(path.read_text().strip(), str(path))
        except OSError as err:
            raise TokenError(f"{ENV_TOKEN_FILE}={path}: {err.strerror}") from None
    path = home / TOKEN_FILE
    if not path.exists():  # every worker imports the service: the first link wins, the others read it
        home.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{TOKEN_FILE}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    log.warning("no %s or %s set: clients authenticate with the token in %s", ENV_TOKEN, ENV_TOKEN_FILE, path)
    return _checked(path.read_text().strip(), str(path))


def _checked(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"{source}: the API token must have at least {MIN_TOKEN_CHARS} characters")
    return token


def bearer(token: str) -> dict[str, str]:
    """The header a client sends."""
    return {"Authorization": f"Bearer {token}"}


async def respond(
    send: Send, status: int, error: str, detail: str = "", headers: Mapping[str, str] | None = None
) -> None:
    """Answer with ErrorBody directly (the app is not called)."""
    body = ErrorBody(error=error, detail=detail).model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gate:
    """The token of every API request, and content type and body size of every POST, checked before the app
    reads anything (BentoML answers a multipart Content-Type without a boundary with a 500), each sent once."""

    def __init__(self, app: App, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        names = [name for name, _ in scope["headers"]]
        for name in (b"authorization", b"content-type"):
            # sent twice, the check below would read the last and BentoML the first
            if names.count(name) > 1:
                header = name.decode().title()
                await respond(send, 400, f"send one {header} header, not {names.count(name)}", header)
                return
        headers = dict(scope["headers"])
        if scope["path"] in API_ROUTES and not hmac.compare_digest(
            headers.get(b"authorization", b""), self.expected
        ):
            await respond(
                send, 401, "a valid bearer token is required", "Authorization", {"WWW-Authenticate": "Bearer"}
            )
            return
        declared = headers.get(b"content-type", b"application/json")
        if declared.split(b";")[0].strip().lower() != b"application/json":
            await respond(send, 415, "Content-Type must be application/json", "Content-Type")
            return
        body = await _read_body(receive)
        if body is None:
            await respond(send, 413, f"the body must be at most {MAX_BODY_BYTES} bytes", "body")
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None as soon as it passes MAX_BODY_BYTES (the rest is never read)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks)  # the client went away; the app will see an empty or partial body
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class ClientErrors:
    """One body shape and one log line for every 4xx, whatever the route and method (a GET of an API route is
    BentoML's plain-text 405 otherwise); the OpenAPI document says so."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/docs.json":
            await _rewritten(
                self.app, scope, receive, send, lambda _: True, lambda _, body: _documented(body)
            )
            return

        def normalise(status: int, body: bytes) -> bytes:
            error = _error_body(body)
            log.warning("%s %s -> %d: %s", scope["method"], scope["path"], status, error.error)
            return error.model_dump_json().encode()

        await _rewritten(self.app, scope, receive, send, lambda status: 400 <= status < 500, normalise)


async def _rewritten(
    app: App,
    scope: Scope,
    receive: Receive,
    send: Send,
    wanted: Callable[[int], bool],
    rewrite: Callable[[int, bytes], bytes],
) -> None:
    """Run ``app``; a response whose status is ``wanted`` is buffered and sent as the JSON ``rewrite(status, body)``
    with a matching length, any other passes through as it streams (a page is never held back)."""
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def capture(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            if not wanted(message["status"]):
                await send(message)
                return
            start.update(message)
        elif message["type"] == "http.response.body" and not start:
            await send(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                body = rewrite(start["status"], b"".join(chunks))
                replaced = (b"content-length", b"content-type")
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in replaced]
                headers += [
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"application/json"),
                ]
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
        else:
            await send(message)

    await app(scope, receive, capture)


def _error_body(body: bytes) -> ErrorBody:
    """BentoML's 4xx bodies as ErrorBody: a validation error lists pydantic's errors (each with its field's
    path), a raised 4xx is ``[{"error": "field: message"}]``; ours already are ErrorBody."""
    try:
        data = json.loads(body)
    except ValueError:
        return ErrorBody(error=body.decode(errors="replace")[:500] or "bad request")
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        return ErrorBody(error=str(data)[:500])
    if isinstance(data.get("detail"), list):  # pydantic's errors
        problems = [
            (".".join(str(p) for p in e.get("loc", ())), str(e.get("msg", ""))) for e in data["detail"]
        ]
        return ErrorBody(
            error="; ".join(f"{loc}: {msg}" if loc else msg for loc, msg in problems)
            or str(data.get("error")),
            detail=problems[0][0] if problems else "",
        )
    error = str(data.get("error", data))
    field, sep, _ = error.partition(": ")
    detail = str(data.get("detail", "")) or (field if sep and " " not in field else "")
    return ErrorBody(error=error, detail=detail)


def _documented(body: bytes) -> bytes:
    """BentoML's OpenAPI document plus what the gate adds: the bearer scheme on the API routes, and the 401,
    413 and 415 they may answer, all with ErrorBody (the schema BentoML already declares for 400 and 404)."""
    spec = json.loads(body)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema()
    spec["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for route in API_ROUTES:
        post = spec.get("paths", {}).get(route, {}).get("post")
        if post is None:
            continue
        post["security"] = [{"bearer": []}]
        for status, description in (
            ("400", "Bad Request"),
            ("401", "Unauthorized"),
            ("404", "Not Found"),
            ("413", "Payload Too Large"),
            ("415", "Unsupported Media Type"),
        ):
            post["responses"][status] = {"description": description, "content": error}
    return json.dumps(spec).encode()


class QuietClientErrors(logging.Filter):
    """Drops BentoML's traceback record for a client error (ClientErrors logs it in one line); keeps the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        from bentoml.exceptions import BentoMLException
        from pydantic import ValidationError

        exc = record.exc_info[1] if record.exc_info else None
        client = isinstance(exc, ValidationError) or (
            isinstance(exc, BentoMLException) and exc.error_code.value < 500
        )
        return not client

"""Who may call and how much they may send: the API key (constant-time compare), the request
body ceiling, and the Host check that keeps a web page from reaching a loopback server through
DNS rebinding (a browser sends the attacker's host name in Host; we answer only our own)."""
from __future__ import annotations

import hmac
import json

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .errors import error_body

API_KEY_HEADER = "X-API-Key"
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def api_key_check(api_key: str):
    """A dependency that admits a request carrying `api_key` in `X-API-Key` or as
    `Authorization: Bearer KEY`, and answers 401 otherwise."""
    expected = api_key.encode()
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the key given to `serve --api-key`")
    bearer = HTTPBearer(auto_error=False, description="the key given to `serve --api-key`")

    async def require_key(key: str | None = Security(header),
                          token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = key if key is not None else (token.credentials if token is not None else None)
        # compare_digest: the time taken does not tell how many leading characters were right.
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise HTTPException(401, detail=f"missing or wrong API key: send it as '{API_KEY_HEADER}: KEY' or "
                                            "'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})
    return require_key


def allowed_hosts(bound: str) -> list[str]:
    """Host header values to answer: any when bound to every interface (the operator chose to be
    reachable by any name), else the loopback names and the bound address."""
    if bound in WILDCARD_HOSTS:
        return ["*"]
    return sorted(set(LOOPBACK_NAMES + [bound]))


class BodyTooLarge(HTTPException):
    """Raised while a chunked body is read: an HTTPException, so FastAPI's body parsing lets it
    through as the 413 it is (it turns other exceptions into a 400)."""


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_bytes` with 413, by its Content-Length
    before reading anything, or while reading a chunked one; never buffers more than that."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._refuse(send, 400, "bad_request", "Content-Length is not a number")
            if int(length) > self.max_bytes:
                return await self._refuse_large(send)
        received = 0
        started = False

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(413, detail=f"the request body is over this server's limit of "
                                                   f"{self.max_bytes} bytes")
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse_large(send)

    async def _refuse_large(self, send):
        await self._refuse(send, 413, "body_too_large",
                           f"the request body is over this server's limit of {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(send, status: int, kind: str, message: str):
        body = json.dumps(error_body(kind, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

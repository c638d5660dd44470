"""The FastAPI application: routes, error shapes, security layers and the editor's files."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__
from ..errors import PocketDiffusionError
from .a1111_routes import a1111_router
from .errors import RequestError, error_body
from .native_routes import native_router
from .security import BodyLimit, allowed_hosts, api_key_check
from .settings import ServerSettings
from .state import ServerState

STATIC = Path(__file__).resolve().parent / "static"
# The editor loads nothing from elsewhere; saying so keeps an injected script from calling out.
EDITOR_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                             "connect-src 'self'; object-src 'none'; base-uri 'none'",
                  "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
log = logging.getLogger("pocketdiffusion.server")


class EditorFiles(StaticFiles):
    """The editor's files with its security headers. (Not an `@app.middleware("http")`: that
    kind wraps every request's `receive` and hides a client's disconnect from the routes.)"""

    async def get_response(self, path, scope):
        response = await super().get_response(path, scope)
        response.headers.update(EDITOR_HEADERS)
        return response


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.queue.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(state.queue.stop)

    app = FastAPI(title="pocketdiffusion", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion for small hardware: an AUTOMATIC1111-compatible API "
                              "(`/sdapi/v1`), a native job API with server-sent step events (`/api/v1`), "
                              "and the web editor at `/`.")
    app.state.server = state
    guard = [Depends(api_key_check(settings.api_key))] if settings.api_key else []
    app.include_router(a1111_router(state), dependencies=guard)
    app.include_router(native_router(state), dependencies=guard)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError):
        return JSONResponse(error_body("bad_request" if error.status < 500 else "internal", str(error)),
                            status_code=error.status)

    @app.exception_handler(PocketDiffusionError)
    async def engine_error(request: Request, error: PocketDiffusionError):
        return JSONResponse(error_body(type(error).__name__, str(error)), status_code=400)

    # The editor: static files, served without the API key (they hold no data; the page asks
    # for the key and sends it with its API calls).
    @app.get("/", include_in_schema=False)
    async def editor():
        return FileResponse(STATIC / "index.html", headers=EDITOR_HEADERS)

    app.mount("/static", EditorFiles(directory=STATIC), name="static")

    if settings.cors_origins:  # closed unless the operator names the origins
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Authorization", "X-API-Key"])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings.host))
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes)
    return app

"""The HTTP server: an AUTOMATIC1111-compatible API (`/sdapi/v1/...`), a native job API
(`/api/v1/jobs`, with step progress streamed as server-sent events) and the web editor (static
files under `static/`), all in one FastAPI app.

    pocketdiffusion serve --model shapes --port 7860      # then open http://127.0.0.1:7860/

Like the CLI, the server only builds `GenerationRequest`s and iterates runs (DESIGN.md): the
request checks, the metadata and the pictures are the engine's. Needs the `[server]` extra
(FastAPI + uvicorn); `create_app` is imported lazily so `import pocketdiffusion` never needs it.
"""
from __future__ import annotations


def create_app(settings=None):
    """The FastAPI application for `settings` (a `ServerSettings`; default: the default model)."""
    from .app import create_app as _create_app
    return _create_app(settings)


__all__ = ["create_app"]

"""Errors the server answers with a 4xx status, and the JSON body every error has:
`{"detail": message}` (FastAPI's own shape, so its 422s and ours read alike) plus `"error"`,
the kind, as AUTOMATIC1111's API adds it."""
from __future__ import annotations


class RequestError(Exception):
    """Bad input the engine never sees (an undecodable image, a limit, an unknown model name)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def error_body(kind: str, message: str) -> dict[str, str]:
    return {"error": kind, "detail": message}

"""What one server serves and the limits it enforces. Every limit is a clear 4xx for a request
that passes it, so a client learns what to change instead of waiting on a job that cannot fit."""
from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_HOST = "127.0.0.1"  # loopback only: exposing a GPU to the network is an explicit choice
DEFAULT_PORT = 7860  # AUTOMATIC1111's port, so its clients find us where they look


@dataclass
class Limits:
    """Per-request ceilings. The defaults fit a 512-1024 px workflow on small hardware; a server
    for a big GPU raises them with the `serve` options."""

    max_body_bytes: int = 32 * 1024 * 1024  # a few 2048x2048 PNGs in base64
    max_side: int = 2048  # pixels, for width/height and for every uploaded image
    max_steps: int = 150  # A1111's slider maximum
    max_images: int = 16  # batch_size x batch_count (A1111: batch_size x n_iter)
    max_queue: int = 64  # jobs waiting; one more is refused with 429 rather than queued forever
    keep_finished: int = 64  # finished jobs whose results stay fetchable (oldest dropped first)
    keep_pixels: int = 64 * 1024 * 1024  # and at most this many result pixels among them (~200 MB)


@dataclass
class ServerSettings:
    model: str = "shapes"  # a model name (see `pocketdiffusion models`) or a path, chosen by the operator
    devices: list[str | None] = field(default_factory=lambda: [None])  # one worker each; None = auto
    memory: str = "balanced"
    api_key: str | None = None  # when set, every API request must carry it
    cors_origins: list[str] = field(default_factory=list)  # empty: no cross-origin access (closed)
    host: str = DEFAULT_HOST  # the bound address; decides which Host headers are accepted
    limits: Limits = field(default_factory=Limits)
    preview_interval: float = 0.2  # seconds between step previews (a preview costs a little time)

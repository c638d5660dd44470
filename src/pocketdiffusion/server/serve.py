"""`pocketdiffusion serve`: the settings from the command line, the model loaded before the
port opens (a bad model is a one-line error, exit 2), then uvicorn on a socket we bind ourselves
so the line we print names the real port (`--port 0` picks a free one: the tests use that)."""
from __future__ import annotations

import argparse
import os
import socket

from .. import MEMORY_MODES
from ..catalog import DEFAULT_MODEL
from ..cli import MODEL_ENV
from .settings import Limits, ServerSettings


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    limits = Limits(max_body_bytes=args.max_body_mb * 1024 * 1024, max_side=args.max_side,
                    max_steps=args.max_steps, max_images=args.max_images, max_queue=args.max_queue)
    for name, value in vars(limits).items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a number >= 1, got {value}")
    devices = [d.strip() for d in args.device.split(",")] if args.device else [None]
    if args.device and not all(devices):
        raise ValueError(f"--device {args.device!r}: expected devices separated by commas, e.g. cuda:0,cuda:1")
    return ServerSettings(model=args.model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL, devices=devices,
                          memory=args.memory,
                          api_key=args.api_key or None, cors_origins=list(args.cors_origin or []),
                          host=args.host, limits=limits)


def serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        raise ValueError(f"the server needs the [server] extra ({error.name} is missing): "
                         "pip install 'pocketdiffusion[server]'") from None
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: expected a port number in [0, 65535]")
    settings = settings_from_args(args)
    app = create_app(settings)
    app.state.server.queue.load_models()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"pocketdiffusion: serving {app.state.server.models.default} at http://{shown}:{port}/ "
          f"(API docs: /docs{'; API key required' if settings.api_key else ''})", flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    from .settings import DEFAULT_HOST, DEFAULT_PORT
    defaults = Limits()
    parser.add_argument("--model", metavar="MODEL",
                        help="the model served first: a name from `pocketdiffusion models` or a path "
                             "(default: $POCKETDIFFUSION_MODEL, else the embedded model 'shapes'); requests may "
                             "pick any listed model by name")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default: {DEFAULT_HOST}, this machine only; 0.0.0.0 "
                             "opens it to the network: use --api-key then)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    parser.add_argument("--device", metavar="DEVICES",
                        help="cpu, cuda, cuda:N or mps; several separated by commas run one worker each "
                             "(default: cuda when available, else cpu)")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="balanced",
                        help="memory mode, as for generate (default: balanced)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require this key on every API request, as 'X-API-Key: KEY' or 'Authorization: "
                             "Bearer KEY' (default: none)")
    parser.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                        help="allow browser pages from this origin (e.g. http://localhost:3000) to call the API; "
                             "repeat for several (default: none, cross-origin calls are refused)")
    limits = parser.add_argument_group("limits (a request over one gets a 4xx saying which)")
    limits.add_argument("--max-side", type=int, default=defaults.max_side, metavar="PX",
                        help=f"largest width/height, generated or uploaded (default: {defaults.max_side})")
    limits.add_argument("--max-steps", type=int, default=defaults.max_steps, metavar="N",
                        help=f"most denoising steps per request (default: {defaults.max_steps})")
    limits.add_argument("--max-images", type=int, default=defaults.max_images, metavar="N",
                        help=f"most images per request, batch size x count (default: {defaults.max_images})")
    limits.add_argument("--max-queue", type=int, default=defaults.max_queue, metavar="N",
                        help=f"most jobs waiting; more are refused with 429 (default: {defaults.max_queue})")
    limits.add_argument("--max-body-mb", type=int, default=defaults.max_body_bytes // 2 ** 20, metavar="MB",
                        help=f"largest request body (default: {defaults.max_body_bytes // 2 ** 20})")
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info",
                        help="uvicorn's log level (default: info)")

"""A real `pocketdiffusion serve` in its own process on a free loopback port, for the server
tests: the HTTP, the queue and the threads are the ones users get."""
from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

START_TIMEOUT = 120.0  # seconds: importing torch and loading the model on a loaded 2-core CI machine
URL_LINE = re.compile(r"serving \S+ at (http://\S+?)/? ")


class ServerProcess:
    def __init__(self, *options: str):
        self.log = Path(tempfile.mkstemp(prefix="pocketdiffusion-serve-", suffix=".log")[1])
        # One torch thread: pytest-xdist runs another test worker on the other core.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pocketdiffusion", "serve", "--port", "0", "--log-level", "warning",
                 *options], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self.url = self._wait_for_url()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = URL_LINE.search(self.log.read_text(errors="replace"))
            if match:
                url = match.group(1)
                try:  # the line is printed just before uvicorn starts accepting
                    httpx.get(url + "/api/v1/server", timeout=2)
                    return url
                except httpx.TransportError:
                    pass
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start in {START_TIMEOUT} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, **options) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=options.pop("timeout", 120), **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.unlink(missing_ok=True)


def serving(*options: str):
    """A module-scoped `server` fixture: `pocketdiffusion serve *options`, stopped after the
    module. Use as `server = serving(...)`."""
    @pytest.fixture(scope="module")
    def server():
        process = ServerProcess(*options)
        yield process
        process.stop()
    return server


def http_client():
    """A module-scoped `client` fixture: an HTTP client of the module's `server`."""
    @pytest.fixture(scope="module")
    def client(server):
        with server.client() as http:
            yield http
    return client


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))

"""A job: one GenerationRequest on its way through the queue, with the state every client view
(A1111's progress, the native job API, the event stream) reads: queued -> running -> done,
cancelled or failed.

A job is written by one worker thread and read by the event loop. Readers never block the
worker: they wait on `changed()`, which the worker's `_notify` wakes through the loop."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from PIL import Image

from ..pipelines.request import GenerationRequest, Result

TERMINAL = ("done", "cancelled", "failed")


class Job:
    def __init__(self, request: GenerationRequest, model: str, *, warnings: list[str] | None = None):
        self.id = uuid.uuid4().hex
        self.request = request
        self.model = model
        self.warnings = list(warnings or [])
        self.state = "queued"
        self.step = 0  # steps done
        self.total = 0  # steps of the whole run, known once it starts
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.preview: Image.Image | None = None  # the latest step preview
        self.preview_step = 0
        self.cancelled_at_step: int | None = None  # the step running when the cancel arrived
        self.result: Result | None = None
        self.error: str | None = None
        self.error_status = 0  # the HTTP status a synchronous caller answers with: 400 or 500
        self.version = 0  # bumped on every change; event streams send what changed since theirs
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiters: list[asyncio.Future] = []

    # ---- written by the worker thread (or the loop, for a job cancelled while queued) ----

    def start(self, total: int) -> None:
        self._update(state="running", started=time.time(), total=total)

    def advance(self, step: int, preview: Image.Image | None) -> None:
        changes: dict[str, Any] = {"step": step}
        if preview is not None:
            changes.update(preview=preview, preview_step=step)
        self._update(**changes)

    def finish(self, state: str, *, result: Result | None = None, error: str | None = None,
               error_status: int = 0) -> None:
        assert state in TERMINAL
        self._update(state=state, result=result, error=error, error_status=error_status, finished=time.time())

    def _update(self, **changes: Any) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self, name, value)
            self.version += 1
        self._notify()

    # ---- cancel: asked by any thread, honoured by the worker between two steps ----

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self.cancelled_at_step = self.step
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    @property
    def is_finished(self) -> bool:
        return self.state in TERMINAL

    # ---- waiting, on the event loop ----

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _notify(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake_waiters)
            except RuntimeError:  # the loop closed between the check and the call: nobody waits
                pass

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self, since: int, timeout: float) -> bool:
        """Wait until `version` differs from `since` (True) or `timeout` seconds pass (False)."""
        if self.version != since:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            return self.version != since
        return True

    async def wait(self, poll: float = 0.5) -> None:
        """Until the job is finished."""
        while not self.is_finished:
            await self.changed(self.version, poll)

    # ---- what clients see ----

    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        return self.step / self.total if self.total else 0.0

    def eta(self) -> float | None:
        """Seconds left, from the pace so far (None before the first step)."""
        if self.state != "running" or not self.step or self.started is None:
            return None
        elapsed = time.time() - self.started
        return elapsed / self.step * (self.total - self.step)

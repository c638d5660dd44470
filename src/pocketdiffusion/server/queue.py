"""The FIFO queue and its workers: one thread per device, each with its own loaded model, taking
the oldest waiting job. Generation runs in these threads, never on the event loop, so the
server keeps answering progress, cancel and new submissions while a picture is made."""
from __future__ import annotations

import asyncio
import collections
import gc
import logging
import threading
import time
import traceback

from ..pipelines.request import InvalidRequest
from .errors import RequestError
from .jobs import Job
from .models import ModelList
from .settings import ServerSettings

log = logging.getLogger("pocketdiffusion.server")


class JobQueue:
    def __init__(self, settings: ServerSettings, models: ModelList):
        self.settings, self.models = settings, models
        self._pending: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # every job still fetchable, in submission order
        self._cond = threading.Condition()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.workers = [Worker(self, device) for device in settings.devices]

    def load_models(self) -> None:
        """Load the default model on every device: a broken model fails at start, not at the
        first request. Loading again is free."""
        for worker in self.workers:
            worker.load(self.models.default)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.load_models()
        for worker in self.workers:
            worker.thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.finish("cancelled", error="the server is shutting down")
            self._pending.clear()
            for worker in self.workers:
                if worker.job is not None:
                    worker.job.cancel()
            self._cond.notify_all()
        for worker in self.workers:
            if worker.thread.is_alive():
                worker.thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        with self._cond:
            if len(self._pending) >= self.settings.limits.max_queue:
                raise RequestError(f"the queue is full ({len(self._pending)} jobs waiting); try again later",
                                   status=429)
            job.bind(self._loop)
            self._pending.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._cond.notify()
        return job

    def _forget_old(self) -> None:
        """Drop the oldest finished jobs beyond `keep_finished` jobs or `keep_pixels` result
        pixels (their images are memory; a busy server must not grow without end)."""
        limits = self.settings.limits
        kept = pixels = 0
        for job_id, job in reversed(list(self._jobs.items())):
            if not job.is_finished:
                continue
            kept += 1
            pixels += sum(w * h for w, h in (image.size for image in job.result.images)) if job.result else 0
            if kept > limits.keep_finished or pixels > limits.keep_pixels:
                del self._jobs[job_id]

    def take(self) -> Job | None:
        """The oldest waiting job (blocking), or None when the server stops."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            return None if self._stopping else self._pending.popleft()

    def cancel(self, job: Job) -> None:
        """A waiting job is dropped now; a running one stops after its current step."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                job.finish("cancelled")
                return
        if not job.is_finished:
            job.cancel()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job: Job) -> int | None:
        """0 for the next job to run; None when not waiting."""
        with self._cond:
            try:
                return self._pending.index(job)
            except ValueError:
                return None

    def waiting(self) -> int:
        return len(self._pending)

    def running(self) -> list[Job]:
        return [worker.job for worker in self.workers if worker.job is not None]

    def jobs(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())


class Worker:
    """One device: its loaded pipeline and the job it runs."""

    def __init__(self, queue: JobQueue, device: str | None):
        self.queue, self.device = queue, device
        self.pipe = None
        self.model: str | None = None
        self.job: Job | None = None
        self.thread = threading.Thread(target=self._run_forever, name=f"pocketdiffusion-worker-{device or 'auto'}",
                                       daemon=True)

    def load(self, name: str):
        if name != self.model:
            import pocketdiffusion
            self.pipe, self.model = None, None
            gc.collect()  # the previous model's weights go before the next one's arrive
            settings = self.queue.settings
            self.pipe = pocketdiffusion.load(self.queue.models.load_argument(name), device=self.device,
                                             memory=settings.memory)
            self.model = name
        return self.pipe

    def _run_forever(self) -> None:
        while True:
            job = self.queue.take()
            if job is None:
                return
            self.job = job
            try:
                self._execute(job)
            finally:
                self.job = None

    def _execute(self, job: Job) -> None:
        try:
            run = self.load(job.model).run(job.request)
            job.start(run.total_steps)
            interval = self.queue.settings.preview_interval
            last_preview = 0.0
            steps = iter(run)
            try:
                for step in steps:
                    # Checked after every step: an interrupt stops the job within one step.
                    if job.cancel_requested:
                        job.finish("cancelled")
                        return
                    preview = None
                    if time.monotonic() - last_preview >= interval or step.index + 1 == step.total:
                        preview, last_preview = step.preview()[0], time.monotonic()
                    job.advance(step.index + 1, preview)
            finally:
                steps.close()  # a cancelled run's generator is closed now, not when collected
            if job.cancel_requested:
                job.finish("cancelled")
            else:
                job.finish("done", result=run.result)
        except InvalidRequest as error:  # what only the model can tell (e.g. an init image too small)
            job.finish("failed", error=str(error), error_status=400)
        except Exception as error:  # noqa: BLE001 - a bug or an out-of-memory: fail this job, keep serving
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            job.finish("failed", error=f"internal error: {type(error).__name__}: {error}", error_status=500)

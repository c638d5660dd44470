"""What every route shares: the settings, the model list, the queue and the current model."""
from __future__ import annotations

import time

from fastapi import Request

from .jobs import Job
from .models import ModelList
from .queue import JobQueue
from .settings import ServerSettings

DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


class ServerState:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.models = ModelList(settings.model)
        self.current_model = self.models.default  # A1111's sd_model_checkpoint: POST /options changes it
        self.queue = JobQueue(settings, self.models)

    async def wait_for(self, job: Job, request: Request) -> bool:
        """Wait until `job` finishes; if the client goes away first, cancel the job (nobody will
        read its images: the queue moves on) and return False."""
        last_check = time.monotonic()
        while not job.is_finished:
            await job.changed(job.version, DISCONNECT_POLL)
            if time.monotonic() - last_check >= DISCONNECT_POLL and not job.is_finished:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    self.queue.cancel(job)
                    return False
        return True

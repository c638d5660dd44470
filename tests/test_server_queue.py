"""The job queue on its own (no worker started, no model loaded): FIFO positions, cancelling a
waiting job, the queue limit, and forgetting old results."""
from __future__ import annotations

import pytest
from PIL import Image

from pocketdiffusion.pipelines.request import GenerationRequest, Result
from pocketdiffusion.server.errors import RequestError
from pocketdiffusion.server.jobs import Job
from pocketdiffusion.server.models import ModelList
from pocketdiffusion.server.queue import JobQueue
from pocketdiffusion.server.settings import Limits, ServerSettings


def queue_with(**limits) -> JobQueue:
    return JobQueue(ServerSettings(limits=Limits(**limits)), ModelList("shapes"))


def job(prompt: str = "x") -> Job:
    return Job(GenerationRequest(prompt=prompt), "shapes")


def finished(queue: JobQueue, size: int = 0) -> Job:
    done = queue.submit(job())
    queue.take()
    images = [Image.new("RGB", (size, size))] if size else []
    done.finish("done", result=Result(images=images, seeds=[0] * len(images), parameters=[{}] * len(images),
                                      request=done.request))
    return done


def test_jobs_are_taken_oldest_first_and_report_their_place():
    queue = queue_with()
    first, second, third = (queue.submit(job(p)) for p in "abc")
    assert [queue.position(j) for j in (first, second, third)] == [0, 1, 2]
    assert queue.take() is first
    assert queue.position(first) is None and queue.position(third) == 1


def test_cancelling_a_waiting_job_removes_it_at_once():
    queue = queue_with()
    first, second = queue.submit(job("a")), queue.submit(job("b"))
    queue.cancel(first)
    assert first.state == "cancelled" and queue.waiting() == 1 and queue.take() is second


def test_cancelling_a_running_job_asks_its_worker_to_stop():
    queue = queue_with()
    running = queue.submit(job())
    queue.take()
    running.start(total=10)
    running.advance(3, None)
    queue.cancel(running)
    # Still running: its worker ends it after the current step (tests/test_server_jobs.py).
    assert running.cancel_requested and running.cancelled_at_step == 3 and running.state == "running"


def test_a_full_queue_answers_429():
    queue = queue_with(max_queue=2)
    queue.submit(job())
    queue.submit(job())
    with pytest.raises(RequestError, match="queue is full") as caught:
        queue.submit(job())
    assert caught.value.status == 429


def test_old_results_are_forgotten_by_count_and_by_pixels():
    queue = queue_with(keep_finished=2, keep_pixels=100 * 100)
    oldest, middle, newest = finished(queue), finished(queue), finished(queue)
    queue.submit(job())  # forgetting happens on submit
    assert queue.get(oldest.id) is None and queue.get(middle.id) and queue.get(newest.id)
    large = finished(queue, size=80)
    larger = finished(queue, size=90)  # 80^2 + 90^2 > 100^2: the older one goes
    queue.submit(job())
    assert queue.get(larger.id) is not None and queue.get(large.id) is None

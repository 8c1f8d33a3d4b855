"""Dynamic batching: inputs of requests that arrive together share one forward pass, on one inference thread.

A batch starts as soon as the inference thread is free, with every request waiting by then. It waits for
more only while other requests are still arriving (being read or decoded: `expect`), and at most `wait_s`
from the oldest request's arrival: waiting for nobody would only leave the thread idle. A batch holds up
to `max_batch` inputs, never splits a request, and a request larger than `max_batch` runs alone. While a
batch computes (torch releases the GIL), the event loop keeps accepting requests and answering
``/healthz``, and the next batch gathers. A batch that fails is retried request by request, so one bad
request never fails the others, and nothing that happens in a batch ends the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from transferkit.errors import RequestError

log = logging.getLogger(__name__)


@dataclass
class _Job:
    items: list
    future: asyncio.Future
    arrived: float = field(default=0.0)


class Batcher:
    """Collects prepared inputs from concurrent requests into batches for `infer` (list -> rows of probabilities).

    Example (inside a running event loop)::

        batcher = Batcher(predictor.infer, max_batch=64, wait_s=0.005, max_queued=1024)
        batcher.start()
        with batcher.expect():          # while the request is read and decoded
            items = prepare(request)
        proba = await batcher.submit(items, timeout=60)
        await batcher.stop()
    """

    def __init__(self, infer: Callable[[list], np.ndarray], *, max_batch: int, wait_s: float, max_queued: int):
        self.infer, self.max_batch, self.wait_s, self.max_queued = infer, max_batch, wait_s, max_queued
        self.queued = 0  # inputs waiting (not yet in a batch)
        self.arriving = 0  # requests being read or decoded, that will be submitted soon
        self.batches = self.inputs = 0  # computed so far
        self._pending: deque[_Job] = deque()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="transferkit-inference")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False

    @property
    def _event(self) -> asyncio.Event:
        """The wake-up event, made by `start` on the server's event loop."""
        if self._wakeup is None:
            raise RuntimeError("Batcher.start() must run first, on the server's event loop.")
        return self._wakeup

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="transferkit-batcher")

    @contextlib.contextmanager
    def expect(self):
        """Around reading and decoding a request: a batch may wait (up to `wait_s`) for it to join."""
        self.arriving += 1
        try:
            yield
        finally:
            self.arriving -= 1
            if self._wakeup is not None:
                self._wakeup.set()  # a waiting batch need not wait for this one any longer

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, items: list, timeout: float) -> np.ndarray:
        """Probabilities for `items`, once their batch has run.

        Raises:
            RequestError: 503 when the queue is full, stopping, or the answer takes longer than `timeout`.
        """
        if self._closing or not self.alive:
            raise RequestError("The server is stopping; retry on another instance.", 503)
        if self.queued + len(items) > self.max_queued:
            raise RequestError(f"The server is busy ({self.queued} inputs waiting); retry in a moment.", 503)
        loop = asyncio.get_running_loop()
        job = _Job(items, loop.create_future(), loop.time())
        self._pending.append(job)
        self.queued += len(items)
        self._event.set()
        try:  # on timeout or a dropped client, wait_for cancels the future and the job is skipped
            return await asyncio.wait_for(job.future, timeout)
        except asyncio.TimeoutError as e:
            raise RequestError(f"No answer within {timeout:g} s ({self.queued} inputs waiting); retry later.", 503) from e

    async def stop(self) -> None:
        """Answer what is waiting, then end the loop and the inference thread."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            await self._task
        self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        while not (self._closing and not self._pending):
            if not self._pending:
                self._event.clear()
                await self._event.wait()
                continue
            try:
                batch = await self._collect()
                if batch:
                    await self._execute(batch)
            except Exception:  # a bug here must not stop every later request: log it and go on
                log.exception("The batching loop hit an error; continuing with the next batch")

    def _take(self, batch: list[_Job], size: int) -> int:
        """Move waiting jobs into `batch` while they fit; returns the batch's size in inputs."""
        while self._pending and (size == 0 or size + len(self._pending[0].items) <= self.max_batch):
            job = self._pending.popleft()
            self.queued -= len(job.items)
            if not job.future.done():  # cancelled: its client timed out or went away
                batch.append(job)
                size += len(job.items)
        return size

    async def _collect(self) -> list[_Job]:
        loop = asyncio.get_running_loop()
        batch: list[_Job] = []
        size = self._take(batch, 0)
        while batch and size < self.max_batch and not self._pending and self.arriving and not self._closing:
            remaining = batch[0].arrived + self.wait_s - loop.time()
            if remaining <= 0:
                break
            self._event.clear()
            try:
                await asyncio.wait_for(self._event.wait(), remaining)
            except asyncio.TimeoutError:
                break
            size = self._take(batch, size)
        return batch

    async def _execute(self, batch: list[_Job]) -> None:
        items = [x for job in batch for x in job.items]
        try:
            proba = await asyncio.get_running_loop().run_in_executor(self._thread, self.infer, items)
        except Exception as e:
            if len(batch) > 1:  # find the request at fault: the others still get their answers
                for job in batch:
                    await self._execute([job])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(proba[start : start + len(job.items)])
            start += len(job.items)
        self.batches += 1
        self.inputs += len(items)

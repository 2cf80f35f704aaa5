"""Server-side batching of concurrent Predict calls (TF Serving's --enable_batching).

Requests for the same loaded version, signature and outputs whose inputs share dtypes and
inner shapes wait in a queue for up to `batch_timeout_micros`; a batch is concatenated along
dim 0, run once, and its outputs are split back. Knobs and errors follow TF's
SharedBatchScheduler: a task larger than `max_batch_size` is INVALID_ARGUMENT, a full
queue (more than `max_enqueued_batches` waiting batches) is UNAVAILABLE. As in TF's
BatchingSession, a task whose caller's deadline passed while it waited is not run; it fails
with RESOURCE_EXHAUSTED "Run() timeout exceeded while waiting in batching queue".
"""

from __future__ import annotations

import collections
import threading
import time

import grpc
import numpy as np

from serving.inference import run_signature
from serving.tensors import ServingError, invalid_argument

EXPIRED_IN_QUEUE = "Run() timeout exceeded while waiting in batching queue"  # TF's BatchingSession text


class _Task:
    def __init__(self, feeds: dict, size: int, deadline: float | None = None):
        self.feeds = feeds
        self.size = size
        self.deadline = deadline  # on the time.monotonic() clock; None: no deadline
        self.done = threading.Event()
        self.outputs = None
        self.error = None


class _Batch:
    def __init__(self, key, loaded, signature, output_aliases):
        self.key = key
        self.loaded = loaded
        self.signature = signature
        self.output_aliases = output_aliases
        self.tasks: list[_Task] = []
        self.size = 0
        self.created = time.monotonic()
        self.closed = False


class Batcher:
    """Groups compatible Predict runs; use `run` as the runner passed to inference.predict."""

    def __init__(self, max_batch_size: int = 64, batch_timeout_micros: int = 2000,
                 max_enqueued_batches: int = 64, num_batch_threads: int = 1):
        self.max_batch_size = max_batch_size
        self.timeout = batch_timeout_micros / 1e6
        self.max_enqueued_batches = max_enqueued_batches
        self._queues: dict = collections.defaultdict(collections.deque)
        self._condition = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def run(self, loaded, signature, feeds: dict, output_aliases: list[str],
            deadline: float | None = None) -> dict:
        """Outputs of this request's slice of a batch; `deadline` is a time.monotonic() value."""
        size = _batch_size(feeds)
        if size > self.max_batch_size:
            raise invalid_argument(
                f"Task size {size} is larger than maximum input batch size {self.max_batch_size}")
        key = (id(loaded), id(signature), tuple(output_aliases),
               tuple((alias, array.dtype.str, array.shape[1:]) for alias, array in sorted(feeds.items())))
        task = _Task(feeds, size, deadline)
        self._enqueue(key, task, loaded, signature, output_aliases)
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def _enqueue(self, key, task, loaded, signature, output_aliases) -> None:
        with self._condition:
            if self._stopping:
                raise ServingError(grpc.StatusCode.UNAVAILABLE, "Batching is shutting down")
            queue = self._queues[key]
            opened = not queue or queue[-1].closed or queue[-1].size + task.size > self.max_batch_size
            closed_previous = False
            if opened:
                if len(queue) >= self.max_enqueued_batches:
                    # Refused before anything changes: the open batch stays open for tasks that fit.
                    raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                       "The batch scheduling queue to which this task was submitted is full")
                if queue and not queue[-1].closed:
                    queue[-1].closed = closed_previous = True
                queue.append(_Batch(key, loaded, signature, output_aliases))
            batch = queue[-1]
            batch.tasks.append(task)
            batch.size += task.size
            if batch.size >= self.max_batch_size:
                batch.closed = True
            # A batch thread needs waking only when a batch is ready or a new one starts its timeout
            # clock (two things at once when a full batch closed and a new one opened); a task that
            # joins an open batch changes neither, so it wakes nobody.
            if opened or batch.closed:
                self._condition.notify(2 if closed_previous else 1)

    def _next_ready_batch(self):
        """Pop the oldest batch that is full or has waited long enough; else how long to wait."""
        now = time.monotonic()
        wait = None
        for key, queue in list(self._queues.items()):
            if not queue:
                del self._queues[key]
                continue
            batch = queue[0]
            remaining = batch.created + self.timeout - now
            if batch.closed or len(queue) > 1 or remaining <= 0 or self._stopping:
                queue.popleft()
                batch.closed = True
                return batch, None
            wait = remaining if wait is None else min(wait, remaining)
        return None, wait

    def _work(self) -> None:
        while True:
            with self._condition:
                while True:
                    batch, wait = self._next_ready_batch()
                    if batch is not None:
                        break
                    if self._stopping:
                        return
                    self._condition.wait(wait)
            self._execute(batch)

    @staticmethod
    def _execute(batch: _Batch) -> None:
        tasks = _drop_expired(batch.tasks)
        try:
            if tasks:
                _run_tasks(batch, tasks)
        except Exception as error:  # surfaced to each caller as its own failure
            for task in tasks:
                task.error = error
        for task in batch.tasks:
            task.done.set()

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)


def _drop_expired(tasks: list[_Task]) -> list[_Task]:
    """The tasks still worth running; the others get an error (their callers gave up)."""
    now = time.monotonic()
    live = []
    for task in tasks:
        if task.deadline is not None and task.deadline <= now:
            task.error = ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, EXPIRED_IN_QUEUE)
        else:
            live.append(task)
    return live


def _run_tasks(batch: _Batch, tasks: list[_Task]) -> None:
    """Run the tasks as one concatenated batch and give each its slice of the outputs."""
    merged = {alias: np.concatenate([task.feeds[alias] for task in tasks]) for alias in tasks[0].feeds}
    outputs = run_signature(batch.loaded, batch.signature, merged, batch.output_aliases)
    total = sum(task.size for task in tasks)
    offset = 0
    for task in tasks:
        task.outputs = {alias: _slice_output(array, offset, task.size, total) for alias, array in outputs.items()}
        offset += task.size


def _batch_size(feeds: dict) -> int:
    sizes = set()
    for array in feeds.values():
        if array.ndim == 0:
            raise invalid_argument(
                "Batching session Run() must have at least one dimension in every input tensor")
        sizes.add(array.shape[0])
    if len(sizes) != 1:
        raise invalid_argument("Batching session Run() input tensors must have equal 0th-dimension size")
    return sizes.pop()


def _slice_output(array, offset: int, size: int, total: int):
    if array.ndim == 0 or array.shape[0] != total:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           "Batched output tensor's 0th dimension does not equal the sum of the "
                           "0th dimension sizes of the input tensors")
    return array[offset:offset + size]

"""Server-side batching of concurrent Predict calls (TF Serving's --enable_batching).

Requests for the same loaded version, signature and outputs whose inputs share dtypes and
inner shapes wait in a queue for up to `batch_timeout_micros`; a batch is concatenated along
dim 0, run once, and its outputs are split back. Knobs and errors follow TF's
SharedBatchScheduler: a task larger than `max_batch_size` is INVALID_ARGUMENT, a full
queue (more than `max_enqueued_batches` waiting batches) is UNAVAILABLE. As in TF's
BatchingSession, a task whose caller's deadline passed while it waited is not run; it fails
with RESOURCE_EXHAUSTED "Run() timeout exceeded while waiting in batching queue".

Unlike TF's BatchingSession, which gives the status of a failed run to every task of the batch,
a request that would fail alone (a digit of 10 to `sample`) fails alone here: a batch whose run
fails is split in halves, and each half run again, down to the tasks that fail by themselves
(docs/serving.md, differences table).

The knobs come from a text-format `BatchingParameters` file (TF Serving's
`--batching_parameters_file`, read here with the message rebuilt from its .proto, because the
tensorflow-serving-api package ships no `session_bundle_config_pb2`) or from ServeConfig; a knob
set nowhere takes TF's own default (`TF_DEFAULTS`), as `tensorflow_model_server
--enable_batching` without a file does.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import threading
import time

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

from serving.errors import ServingError, invalid_argument
from serving.inference import run_signature

EXPIRED_IN_QUEUE = "Run() timeout exceeded while waiting in batching queue"  # TF's BatchingSession text


# TF's SharedBatchScheduler defaults (QueueOptions: input_batch_size_limit 1000,
# batch_timeout_micros 0, max_enqueued_batches 10; Options: num_batch_threads =
# port::MaxParallelism(), the CPU count), used for every field a BatchingParameters leaves unset.
TF_DEFAULTS = {"max_batch_size": 1000, "batch_timeout_micros": 0, "max_enqueued_batches": 10,
               "num_batch_threads": os.cpu_count() or 1}
KNOBS = tuple(TF_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """The four scheduler knobs the Batcher runs with (all resolved, none None)."""

    max_batch_size: int
    batch_timeout_micros: int
    max_enqueued_batches: int
    num_batch_threads: int


@functools.lru_cache(maxsize=None)
def batching_parameters_class():
    """tensorflow.serving.BatchingParameters (session_bundle_config.proto), built from its fields.

    Field names, numbers and types follow the .proto; a file naming any other field fails to
    parse, as it would in tensorflow_model_server.
    """
    file_proto = descriptor_pb2.FileDescriptorProto(
        name="digitgan/session_bundle_config.proto", package="tensorflow.serving", syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"])
    message = file_proto.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for name, number, wrapper in (("max_batch_size", 1, "Int64Value"), ("batch_timeout_micros", 2, "Int64Value"),
                                  ("max_enqueued_batches", 3, "Int64Value"), ("num_batch_threads", 4, "Int64Value"),
                                  ("thread_pool_name", 5, "StringValue"),
                                  ("enable_large_batch_splitting", 8, "BoolValue"),
                                  ("max_execution_batch_size", 9, "Int64Value")):
        message.field.add(name=name, number=number, label=field.LABEL_OPTIONAL, type=field.TYPE_MESSAGE,
                          type_name=f".google.protobuf.{wrapper}")
    message.field.add(name="allowed_batch_sizes", number=6, label=field.LABEL_REPEATED, type=field.TYPE_INT64)
    message.field.add(name="pad_variable_length_inputs", number=7, label=field.LABEL_OPTIONAL, type=field.TYPE_BOOL)
    pool = descriptor_pool.DescriptorPool()  # our own pool: nothing else can clash with these names
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    pool.Add(file_proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))


def read_batching_parameters_file(path: str) -> dict[str, int]:
    """The knobs a text-format BatchingParameters file sets (unset ones are left out).

    Raises ValueError naming the file for an unreadable file, a parse error, or values TF would
    refuse (a non-positive size or thread count, a negative timeout, allowed_batch_sizes whose
    last entry is not max_batch_size).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ValueError(f"cannot read batching_parameters_file {path!r}: {error.strerror or error}") from None
    try:
        parameters = text_format.Parse(text, batching_parameters_class()())
    except text_format.ParseError as error:
        raise ValueError(f"Invalid protobuf file: {path!r}: not a text-format "
                         f"tensorflow.serving.BatchingParameters: {error}") from None
    values = {name: getattr(parameters, name).value for name in KNOBS if parameters.HasField(name)}
    for name, value in values.items():
        lowest = 0 if name == "batch_timeout_micros" else 1
        if value < lowest:
            raise ValueError(f"{name} in {path!r} must be >= {lowest}, got {value}")
    if parameters.allowed_batch_sizes:
        expected = values.get("max_batch_size", TF_DEFAULTS["max_batch_size"])
        if parameters.allowed_batch_sizes[-1] != expected:
            raise ValueError(f"{path!r}: Last entry in allowed_batch_sizes must match max_batch_size; last entry "
                             f"was {parameters.allowed_batch_sizes[-1]}; expected {expected}")
    return values


def resolve_options(file_path: str | None = None, **explicit: int | None) -> BatchingOptions:
    """The knobs to run with: the file's, then the explicit (non-None) ones, then TF's defaults."""
    values = dict(TF_DEFAULTS)
    if file_path is not None:
        values.update(read_batching_parameters_file(file_path))
    values.update({name: value for name, value in explicit.items() if value is not None})
    return BatchingOptions(**values)


def batching_parameters_text(values: dict[str, int]) -> str:
    """Text-format BatchingParameters setting exactly the given knobs (for tensorflow_model_server)."""
    message = batching_parameters_class()()
    for name, value in values.items():
        getattr(message, name).value = value
    return text_format.MessageToString(message)


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

    def __init__(self, max_batch_size: int = TF_DEFAULTS["max_batch_size"],
                 batch_timeout_micros: int = TF_DEFAULTS["batch_timeout_micros"],
                 max_enqueued_batches: int = TF_DEFAULTS["max_enqueued_batches"],
                 num_batch_threads: int = TF_DEFAULTS["num_batch_threads"]):
        self.max_batch_size = max_batch_size
        self.timeout = batch_timeout_micros / 1e6
        self.max_enqueued_batches = max_enqueued_batches
        self._queues: dict = collections.defaultdict(collections.deque)
        self._condition = threading.Condition()
        # Tasks enqueued, batches taken from the queues, and graph runs (more than batches when a
        # failed batch is split); for tests and monitoring, read with counts().
        self._counts = collections.Counter(tasks=0, batches=0, runs=0)
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
            self._counts["tasks"] += 1
            batch.size += task.size
            if batch.size >= self.max_batch_size:
                batch.closed = True
            # A batch thread needs waking only when a batch is ready or a new one starts its timeout
            # clock (two things at once when a full batch closed and a new one opened); a task that
            # joins an open batch changes neither, so it wakes nobody.
            if opened or batch.closed:
                self._condition.notify(2 if closed_previous else 1)

    def counts(self) -> dict[str, int]:
        """{"tasks": enqueued, "batches": taken from the queues to run, "runs": graph runs}."""
        with self._condition:
            return dict(self._counts)

    def waiting_tasks(self) -> int:
        """Tasks queued in batches that have not started running (for tests and monitoring)."""
        with self._condition:
            return sum(len(batch.tasks) for queue in self._queues.values() for batch in queue)

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

    def _execute(self, batch: _Batch) -> None:
        with self._condition:
            self._counts["batches"] += 1
        try:
            self._run_isolating_failures(batch, batch.tasks)
        finally:
            for task in batch.tasks:
                task.done.set()

    def _run_isolating_failures(self, batch: _Batch, tasks: list[_Task]) -> None:
        """Run the tasks as one batch; when that run fails, each half again, so a task that
        fails by itself gets its own error and the others their outputs.

        One bad task among n costs about 2 log2(n) more runs; every task bad, 2n - 1 runs.
        """
        tasks = _drop_expired(tasks)
        if not tasks:
            return
        with self._condition:
            self._counts["runs"] += 1
        try:
            _run_tasks(batch, tasks)
        except Exception as error:  # surfaced to the caller as its own failure
            if len(tasks) == 1:
                tasks[0].error = error
                return
            middle = len(tasks) // 2
            self._run_isolating_failures(batch, tasks[:middle])
            self._run_isolating_failures(batch, tasks[middle:])

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

"""The worker pool that loads records ahead of the consumer, so that JSON parsing, tokenization
and image decoding overlap the training step.

- 0 workers: each record is loaded in the consuming thread when it is submitted.
- "threads": no new processes, nothing pickled; the threads share the GIL, so they help
  little where loading is CPU-bound Python.
- "processes": spawned processes, each with a pickled copy of the loader (without its
  annotations); a job sends one record's JSON line and returns the row and image. These are
  what scales with CPU cores.

Images are read in the workers, from disk or a `gs://` bucket, so `num_workers` also bounds
how many are read at once. A worker process makes its own filesystem client and event loop
(spawned, it inherits none of the parent's gcsfs state).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle
import signal
from collections.abc import Callable
from typing import Any

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.train.data.records import parse_record

WORKER_TYPES = ("threads", "processes")
_worker_loader = None  # in a worker process: its copy of the loader


class _InlineExecutor:
    """`num_workers=0`: runs each job when submitted, in the calling thread."""

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised by future.result()
            future.set_exception(e)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def _start_worker(loader_bytes: bytes) -> None:
    global _worker_loader
    # Ctrl-C reaches the whole process group: the trainer decides when to stop, and the pool
    # ends its workers when it shuts down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_loader = pickle.loads(loader_bytes)


def _load_in_worker(line: bytes, position: tuple[int, int]):
    return _worker_loader.load_record(parse_record(line), position)


def start_workers(
    num_workers: int,
    worker_type: str,
    *,
    loader: Any,
    load: Callable[[int, int], Any],
    line: Callable[[int], bytes],
) -> tuple[Any, Callable[[int], concurrent.futures.Future]]:
    """Starts the pool.

    Args:
        num_workers: 0 loads inline.
        worker_type: one of `WORKER_TYPES`.
        loader: what a worker process gets a pickled copy of; it must have
            `load_record(record, (epoch, index))`.
        load: (record index, epoch) -> the loaded row and image (threads and inline).
        line: record index -> its JSON bytes (sent to a worker process).

    Returns:
        `(executor, submit)`: `submit(i, epoch)` is the Future of record `i`'s row and image; call
        `executor.shutdown` when done.

    Raises:
        VipLlavaError: worker_type="processes" and the loader cannot be pickled.
    """
    if not num_workers:
        pool = _InlineExecutor()
    elif worker_type == "threads":
        pool = concurrent.futures.ThreadPoolExecutor(num_workers, "vipllava-data")
    else:  # "spawn": a forked child of a process running JAX's threads can deadlock
        try:
            state = pickle.dumps(loader)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise VipLlavaError(f"worker_type='processes': this loader cannot be sent to "
                                f"worker processes ({e}); use worker_type='threads'") from None
        pool = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker, initargs=(state,))
        return pool, lambda i, epoch: pool.submit(_load_in_worker, line(i), (epoch, i))
    return pool, lambda i, epoch: pool.submit(load, i, epoch)

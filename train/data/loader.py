"""`RecordLoader`: static-shape batches from a JSON/JSONL annotation file + an image folder, with
the order, host shares, resumable position, workers and skip counting that every record format
shares; `LoaderOptions`: its settings, one frozen value for every loader."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vipllava_jax import storage
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.images import load_image
from vipllava_jax.train.data.records import SKIP_REASONS, STRICT_REASONS, Annotations, SkipRecord
from vipllava_jax.train.data.workers import WORKER_TYPES, start_workers


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How a loader batches, orders, shards and loads its records.

    Attributes:
        batch_size: rows per batch on this host.
        max_length: L, the padded (and truncated) sequence length.
        seed: shuffling seed; the order of epoch e depends on (seed, e) only.
        shuffle: False keeps the file order.
        num_epochs: stop after this many passes; None repeats forever (use a fixed step count
            then, so that all hosts take the same number of batches).
        process_index, process_count: this host and the number of hosts (None:
            `jax.process_index()` and `jax.process_count()`).
        num_workers: loader workers; 0 loads in the consuming thread.
        worker_type: "threads" or "processes" (spawned; each gets a pickled copy of the loader
            without the annotations; see `workers`).
        prefetch: records loaded ahead of the consumer (None: `2 * batch_size`; at least
            `num_workers`).
        strict: raise on bad JSON, malformed records and unreadable images instead of skipping
            them.

    Raises:
        VipLlavaError: a non-positive batch_size, negative num_workers or unknown worker_type.
    """

    batch_size: int
    max_length: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    process_index: int | None = None
    process_count: int | None = None
    num_workers: int = 8
    worker_type: str = "threads"
    prefetch: int | None = None
    strict: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise VipLlavaError(f"batch_size must be positive, got {self.batch_size}")
        if self.num_workers < 0:
            raise VipLlavaError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.worker_type not in WORKER_TYPES:
            raise VipLlavaError(f"worker_type must be one of {WORKER_TYPES}, got {self.worker_type!r}")

    @classmethod
    def merge(cls, options: LoaderOptions | None, **fields: Any) -> LoaderOptions:
        """`options` with `fields` replaced, or `LoaderOptions(**fields)` when it is None."""
        if options is None:
            return cls(**fields)
        return dataclasses.replace(options, **fields) if fields else options

    def for_this_process(self) -> LoaderOptions:
        """These options with `process_index` and `process_count` filled in from JAX.

        Raises:
            VipLlavaError: process_index is not in [0, process_count).
        """
        index, count = self.process_index, self.process_count
        if index is None or count is None:
            import jax

            index = jax.process_index() if index is None else index
            count = jax.process_count() if count is None else count
        if not 0 <= index < count:
            raise VipLlavaError(f"process_index {index} not in [0, {count})")
        return dataclasses.replace(self, process_index=index, process_count=count)


class RecordLoader:
    """Static-shape batches from a JSON/JSONL annotation file + an image folder. Subclasses say
    how a record becomes a row (`load_record`) and rows a batch (`_collate`).

    Epoch `e`'s order is a permutation seeded by `(seed, e)`, identical on every host; host `p`
    of `P` takes every P-th record of it. `state_dict()` (epoch, index into the host's share,
    stats) is taken at batch boundaries, so a loader restored from it yields exactly the batches
    the original would have yielded next. Iteration starts at the current position; breaking
    out and iterating again continues after the last batch yielded. A final partial batch of a
    finite run is dropped.

    Attributes:
        options: the `LoaderOptions`, process_index and process_count filled in.
        stats: counters for this host: `examples` (records used), `batches`, `truncated`
            (rows cut to max_length) and `skipped_<reason>` per `SKIP_REASONS`. A bad record
            is counted each time an epoch reaches it.
        records_per_epoch: records in this host's share of one epoch (before skipping).
    """

    def __init__(
        self,
        annotations: str | Path,
        image_folder: str | Path | None,
        options: LoaderOptions | None = None,
        **fields: Any,
    ):
        """Reads the annotations (not the images).

        Args:
            annotations: a JSON list or JSONL file of records, local or `gs://`.
            image_folder: the folder `record["image"]` is relative to, local or `gs://`
                (default: the annotation file's folder).
            options: the loader's settings.
            fields: `LoaderOptions` fields, replacing those of `options` (or making them, with
                batch_size and max_length, when `options` is None).

        Raises:
            VipLlavaError: bad options, an unreadable annotation file, or (strict) a bad line.
        """
        options = LoaderOptions.merge(options, **fields).for_this_process()
        self.options = options
        self.process_index, self.process_count = options.process_index, options.process_count
        self.annotations = Annotations(annotations, strict=options.strict)
        self.image_folder = storage.path(image_folder) if image_folder else self.annotations.path.parent
        self.prefetch = max(options.prefetch or 2 * options.batch_size, options.num_workers, 1)
        self.records_per_epoch = len(range(self.process_index, len(self.annotations), self.process_count))
        if self.records_per_epoch == 0:
            raise VipLlavaError(
                f"{self.annotations.path} has {len(self.annotations)} records: none for host "
                f"{self.process_index} of {self.process_count}"
            )
        self.stats = self._zero_stats()
        self._epoch, self._index = 0, 0

    def load_record(
        self, record: dict[str, Any], position: tuple[int, int] = (0, 0)
    ) -> tuple[Any, np.ndarray]:
        """A parsed record as (row with a `truncated` attribute, preprocessed image); raises
        `SkipRecord`. `position` is (epoch, record index in the file): with the seed, what
        random drawing a record gets (`record_rng`). Runs in the workers."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        """What a worker process gets: no annotations (it is sent one line per job)."""
        return {**self.__dict__, "annotations": None}

    def _collate(self, rows: list[tuple[Any, np.ndarray]]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def record_rng(self, position: tuple[int, int]) -> np.random.Generator:
        """The random generator of the record at `position` = (epoch, record index): seeded by
        (seed, epoch, index), so a resumed run or another host draws the same."""
        return np.random.default_rng([self.options.seed, *position])

    def _image(self, record: dict[str, Any], preprocess, mark=None) -> np.ndarray:
        """The record's one image, read from the image folder, passed through `mark` (PIL image
        -> PIL image, e.g. drawing markers) and preprocessed. Runs in the workers: at most
        `num_workers` images are read at once, from disk or a bucket (a `gs://` read is
        retried on transient errors by `load_image`; the filesystem client is made in the
        worker's own process). A missing or unreadable file, after the retries, skips the
        record as `bad_image`."""
        image = record.get("image")
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        if not image:
            raise SkipRecord("no_image", "the record has no image (text-only is not supported)")
        if not isinstance(image, str):
            raise SkipRecord("malformed", f"'image' must be one file name, got {image!r}")
        path = self.image_folder / image
        try:
            loaded = load_image(path)
        except Exception as e:  # noqa: BLE001 - missing, truncated or undecodable files
            raise SkipRecord("bad_image", f"cannot read image {path}: {e}") from None
        return preprocess(mark(loaded) if mark is not None else loaded)

    @staticmethod
    def _zero_stats() -> dict[str, int]:
        keys = ["examples", "batches", "truncated", *(f"skipped_{r}" for r in SKIP_REASONS)]
        return dict.fromkeys(keys, 0)

    # -- order and position

    def order(self, epoch: int) -> np.ndarray:
        """Record indices (into the annotation file) this host reads in `epoch`, in order."""
        n = len(self.annotations)
        if self.options.shuffle:
            perm = np.random.default_rng([self.options.seed, epoch]).permutation(n)
        else:
            perm = np.arange(n)
        return perm[self.process_index :: self.process_count]

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded, with the stats (JSON-serializable)."""
        return {
            "epoch": self._epoch, "index": self._index, "seed": self.options.seed,
            "process_index": self.process_index, "process_count": self.process_count,
            "stats": dict(self.stats),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continues from a `state_dict()` of a loader over the same data and hosts.

        Raises:
            VipLlavaError: the state was saved with another seed or host layout, or its index
                is out of range.
        """
        for key in ("seed", "process_index", "process_count"):
            mine = getattr(self.options, key)
            if key in state and state[key] != mine:
                raise VipLlavaError(
                    f"the data state was saved with {key}={state[key]}, this loader has {mine}"
                )
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < self.records_per_epoch:
            raise VipLlavaError(
                f"data state epoch={epoch} index={index} is out of range "
                f"({self.records_per_epoch} records per epoch on this host)"
            )
        self._epoch, self._index = epoch, index
        self.stats = {**self._zero_stats(), **state.get("stats", {})}

    def _positions(self) -> Iterator[tuple[int, int, int]]:
        """This host's records from the current position on, each as (record index, its epoch,
        epoch, index) where the last (epoch, index) is the position after it."""
        epoch, index, num_epochs = self._epoch, self._index, self.options.num_epochs
        while num_epochs is None or epoch < num_epochs:
            order = self.order(epoch)
            for i in range(index, len(order)):
                after = (epoch, i + 1) if i + 1 < len(order) else (epoch + 1, 0)
                yield int(order[i]), epoch, *after
            epoch, index = epoch + 1, 0

    def validate(self) -> tuple[int, list[str]]:
        """Loads every record of this host's share once, in file order (images too, markers
        drawn), without batching: (usable records, one line per unusable one naming its place
        and why). For a pass over the data before a long run (`vipllava-train --validate`)."""
        usable, problems = 0, []
        for i in range(self.process_index, len(self.annotations), self.process_count):
            try:
                self._load(i, 0)
                usable += 1
            except SkipRecord as e:
                problems.append(f"{self.annotations.where(i)}: {e.reason}: {e}")
        return usable, problems

    # -- loading

    def _load(self, i: int, epoch: int):
        return self.load_record(self.annotations.record(i), (epoch, i))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pool, submit = start_workers(
            self.options.num_workers, self.options.worker_type,
            loader=self, load=self._load, line=self.annotations.line,
        )
        positions = self._positions()
        pending: collections.deque = collections.deque()

        def submit_next() -> None:
            for i, record_epoch, epoch, index in positions:
                pending.append((i, epoch, index, submit(i, record_epoch)))
                return

        try:
            for _ in range(self.prefetch):
                submit_next()
            rows, skipped_in_a_row = [], 0
            while pending:
                i, epoch, index, future = pending.popleft()
                submit_next()
                try:
                    loaded = future.result()
                except SkipRecord as e:
                    if self.options.strict and e.reason in STRICT_REASONS:
                        raise VipLlavaError(f"{self.annotations.where(i)}: {e}") from None
                    self.stats[f"skipped_{e.reason}"] += 1
                    skipped_in_a_row += 1
                    if skipped_in_a_row >= self.records_per_epoch:
                        raise VipLlavaError(
                            f"a whole epoch of {self.annotations.path} on host "
                            f"{self.process_index} had no usable record; stats: {self.stats}"
                        ) from None
                    loaded = None
                if loaded is not None:
                    skipped_in_a_row = 0
                    self.stats["examples"] += 1
                    self.stats["truncated"] += loaded[0].truncated
                    rows.append(loaded)
                if len(rows) == self.options.batch_size:
                    self._epoch, self._index = epoch, index
                    self.stats["batches"] += 1
                    batch, rows = self._collate(rows), []
                    yield batch
            if self.options.num_epochs is not None:
                self._epoch, self._index = self.options.num_epochs, 0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

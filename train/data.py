"""Training data: LLaVA-format conversations + an image folder -> static-shape numpy batches.

Input: a JSON list or a JSONL file of records like ViP-LLaVA's training sets::

    {"id": "...", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the red box?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Each record becomes one row of a batch (`TrainDataLoader`):

- `input_ids` [B, L] int32: the chat prompt (`prompts.TEMPLATES`, "vipllava" or "llava_v1")
  tokenized as one string, exactly as `VipLlavaProcessor` tokenizes it at inference, with the
  `<image>` placeholder expanded to `num_image_tokens` image tokens. The placeholder is moved to
  the start of the first question, as LLaVA's `preprocess_multimodal` does.
- `labels` [B, L] int32: -100 everywhere except each assistant answer and the separator that
  closes it (`###` for "vipllava", `</s>` for "llava_v1"), as ViP-LLaVA trains, and the space
  before the answer (sentencepiece folds it into the answer's first token, `▁A`; at inference
  the prompt ends at `{assistant}:` and the model writes it). Labels are not shifted (the
  model's loss predicts `labels[t + 1]` at `t`). A token is labelled when its character span
  (tokenizer offsets) overlaps such a span, so the boundaries are those of the real
  tokenization; a token that straddles a boundary is labelled.
- `attention_mask` [B, L] int32; rows are padded on the RIGHT to `max_length` (`pad_token_id`,
  labels -100), which is what causal training wants; generation uses left padding instead.
- `pixel_values` [B, 3, H, W] float32: one image per record, preprocessed by the processor's
  image processor (build the processor with `pad_to_square=True` for ViP-LLaVA's expand2square).

Records that cannot be used are skipped and counted in `TrainDataLoader.stats`
(`skipped_<reason>`, reasons in `SKIP_REASONS`); with `strict=True` the data errors (bad JSON,
malformed record, unreadable image) raise `VipLlavaError` naming the line instead. Records
without an image are skipped (text-only training is not supported). A row longer than
`max_length` is truncated (`truncated` counts it) unless the cut would fall inside or before
the image tokens, or remove every labelled token; those records are skipped.

Determinism: epoch `e`'s order is a permutation seeded by `(seed, e)`, identical on every host;
host `p` of `P` takes every P-th record of it. `state_dict()` (epoch, index into the host's
share, stats) is taken at batch boundaries, so a loader restored from it yields exactly the
batches the original would have yielded next.

Loading runs in workers that work ahead of the consumer, so that JSON parsing, tokenization
and image decoding overlap the training step: `worker_type="threads"` (the default: no new
processes, nothing pickled) or `"processes"` (spawned processes, each with a copy of the
loader; a job sends one record's JSON line and returns the row and image). Threads share the
GIL: on a 2-core CPU 2 threads load fewer records/s than the consuming thread alone (660-770
against 990-1280, `benchmarks/loader.py`), and on a 16-core GPU host 8 threads fed the tiny
model only ~830 records/s. Processes are what scales with cores (on 2 cores they only match
the consuming thread: the cores are the limit there). grain (installable) would add
array-record, protobuf, etils, absl and cloudpickle for features (sharding, seeded shuffle,
resumable position, worker processes) that take a few lines here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import multiprocessing
import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.nn.losses import IGNORE_INDEX
from vipllava_jax.processing.images import load_image
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import TEMPLATES

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
# Why a record was skipped; `stats` counts each as `skipped_<reason>`. The first three are data
# errors that `strict=True` turns into exceptions.
SKIP_REASONS = ("bad_json", "malformed", "bad_image", "no_image", "image_truncated", "no_targets")
STRICT_REASONS = frozenset(("bad_json", "malformed", "bad_image"))


class SkipRecord(Exception):
    """A record that cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses from worker processes intact
        return SkipRecord, (self.reason, str(self))


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized record, not yet padded.

    Attributes:
        input_ids: [T] int32, image tokens expanded.
        labels: [T] int32, IGNORE_INDEX outside the answers + separators.
        image_start: index of the first image token in `input_ids`.
        truncated: whether the row was cut to `max_length`.
    """

    input_ids: np.ndarray
    labels: np.ndarray
    image_start: int
    truncated: bool = False


# ----------------------------------------------------------------------------- conversations


def normalize_conversation(
    conversations: Any, image_token: str = "<image>"
) -> list[tuple[str, str]]:
    """LLaVA `conversations` -> (question, answer) pairs, `image_token + "\\n"` before the first
    question.

    A leading assistant message is dropped and so is a trailing question without an answer
    (LLaVA does the first; the second has nothing to learn). Image placeholders are removed
    wherever they are and the text around them stripped, as LLaVA's `preprocess_multimodal`.

    Raises:
        SkipRecord("malformed"): not a list of {"from", "value"} dicts, roles that do not
            alternate, more than one image placeholder, or no question/answer pair.
    """
    if not isinstance(conversations, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("value"), str)
        and m.get("from") in USER_ROLES + ASSISTANT_ROLES
        for m in conversations
    ):
        raise SkipRecord(
            "malformed", "'conversations' must be a list of {'from': human|gpt, 'value': str}"
        )
    messages = list(conversations)
    if messages and messages[0]["from"] in ASSISTANT_ROLES:
        messages = messages[1:]
    if len(messages) % 2:
        messages = messages[:-1]
    if not messages:
        raise SkipRecord("malformed", "the conversation has no question/answer pair")
    n_images = sum(m["value"].count(image_token) for m in messages)
    if n_images > 1:
        raise SkipRecord("malformed", f"{n_images} {image_token} placeholders, one image allowed")
    turns = []
    for i in range(0, len(messages), 2):
        question, answer = messages[i], messages[i + 1]
        if question["from"] not in USER_ROLES or answer["from"] not in ASSISTANT_ROLES:
            raise SkipRecord("malformed", f"message {i} and {i + 1} are not a human/gpt pair")
        q = question["value"]
        if image_token in q:
            q = q.replace(image_token, "").strip()
        turns.append((q, answer["value"]))
    turns[0] = (f"{image_token}\n{turns[0][0]}", turns[0][1])
    return turns


def conversation_prompt(
    turns: Sequence[tuple[str, str]], template: str = "vipllava"
) -> tuple[str, list[tuple[int, int]]]:
    """The training prompt and the character spans the loss is taken on.

    Args:
        turns: (question, answer) pairs; questions carry their own image placeholders.
        template: a key of `prompts.TEMPLATES`.

    Returns:
        `(prompt, spans)`: the prompt is `build_prompt`'s for these answered turns; each span
        `[start, end)` covers one answer, the separator closing it and the space before it
        (generation starts right after `{assistant}:`, so the model writes that space).
    """
    if template not in TEMPLATES:
        raise VipLlavaError(f"unknown template {template!r} (known: {sorted(TEMPLATES)})")
    style = TEMPLATES[template]
    user, assistant = style.roles
    prompt, spans = style.system + style.seps[0], []
    for question, answer in turns:
        prompt += f"{user}: {question}{style.seps[0]}{assistant}:"
        start = len(prompt)  # the space too: at inference the prompt ends at the colon
        prompt += f" {answer}{style.seps[1]}"
        spans.append((start, len(prompt)))
    return prompt, spans


class ConversationEncoder:
    """Tokenizes conversations into (input_ids, labels) for one processor and template.

    Uses a private copy of the processor's Rust tokenizer (no truncation or padding), so it is
    safe to call from several threads and gives the same ids as `VipLlavaProcessor`.
    """

    def __init__(self, processor: VipLlavaProcessor, template: str = "vipllava"):
        """Args:
            processor: gives the tokenizer (a fast one: offsets are needed), image token and
                `num_image_tokens`.
            template: "vipllava" or "llava_v1".

        Raises:
            VipLlavaError: a slow tokenizer or an unknown template.
        """
        from tokenizers import Tokenizer

        if template not in TEMPLATES:
            raise VipLlavaError(f"unknown template {template!r} (known: {sorted(TEMPLATES)})")
        backend = getattr(processor.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise VipLlavaError("training data needs a fast (tokenizers) tokenizer for offsets")
        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.template = template
        self.image_token = processor.image_token
        self.image_token_id = processor.image_token_id
        self.num_image_tokens = processor.num_image_tokens

    def __call__(self, conversations: Any) -> Example:
        """LLaVA `conversations` -> an unpadded, untruncated `Example`.

        Raises:
            SkipRecord("malformed"): see `normalize_conversation`, or the placeholder did not
                tokenize to exactly one image token.
        """
        prompt, spans = conversation_prompt(
            normalize_conversation(conversations, self.image_token), self.template
        )
        enc = self._tokenizer.encode(prompt, add_special_tokens=True)
        ids = np.asarray(enc.ids, np.int32)
        offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        target = np.zeros(len(ids), bool)
        for a, b in spans:
            target |= (starts < b) & (ends > a)
        target &= ends > starts  # tokens the post-processor added (<s>) have empty spans
        labels = np.where(target, ids, IGNORE_INDEX).astype(np.int32)

        where = np.flatnonzero(ids == self.image_token_id)
        if len(where) != 1:
            raise SkipRecord(
                "malformed", f"the prompt tokenized to {len(where)} image tokens instead of 1"
            )
        k, n = int(where[0]), self.num_image_tokens
        ids = np.concatenate([ids[:k], np.full(n, self.image_token_id, np.int32), ids[k + 1:]])
        labels = np.concatenate([labels[:k], np.full(n, IGNORE_INDEX, np.int32), labels[k + 1:]])
        return Example(ids, labels, image_start=k)


def fit_length(example: Example, max_length: int, num_image_tokens: int) -> Example:
    """Cuts `example` to `max_length` tokens.

    Raises:
        SkipRecord("image_truncated"): the cut would fall inside or before the image tokens.
        SkipRecord("no_targets"): no labelled token is left.
    """
    if len(example.input_ids) > max_length:
        if example.image_start + num_image_tokens > max_length:
            raise SkipRecord(
                "image_truncated",
                f"the image tokens end at {example.image_start + num_image_tokens} > "
                f"max_length={max_length}",
            )
        example = dataclasses.replace(
            example, input_ids=example.input_ids[:max_length], labels=example.labels[:max_length],
            truncated=True,
        )
    if not np.any(example.labels != IGNORE_INDEX):
        raise SkipRecord("no_targets", "no answer token is left within max_length")
    return example


# ----------------------------------------------------------------------------- annotation files


class Annotations:
    """The records of a JSON list or JSONL file, kept as compact JSON bytes, parsed on demand.

    Attributes:
        path: the file.
        jsonl: whether it is JSONL (one record per line) rather than a JSON list.
    """

    def __init__(self, path: str | Path, *, strict: bool = False):
        """Reads `path`; blank JSONL lines are ignored.

        Raises:
            VipLlavaError: the file does not exist, a JSON list file does not parse, or (with
                `strict`) a JSONL line does not parse (the message names the line).
        """
        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except OSError as e:
            raise VipLlavaError(f"cannot read annotations {self.path}: {e}") from None
        self.jsonl = not raw.lstrip().startswith(b"[")
        if self.jsonl:
            self._lines, self._line_numbers = [], []
            for number, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    self._lines.append(line)
                    self._line_numbers.append(number)
            if strict:
                for i in range(len(self._lines)):
                    try:
                        self.record(i)
                    except SkipRecord as e:
                        raise VipLlavaError(f"{self.where(i)}: {e}") from None
        else:
            try:
                records = json.loads(raw)
            except json.JSONDecodeError as e:
                raise VipLlavaError(f"{self.path} line {e.lineno}: invalid JSON: {e.msg}") from None
            self._lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
            self._line_numbers = None

    def __len__(self) -> int:
        return len(self._lines)

    def where(self, i: int) -> str:
        """Names record `i` for messages: `file line N` (JSONL) or `file record #i`."""
        if self._line_numbers is not None:
            return f"{self.path} line {self._line_numbers[i]}"
        return f"{self.path} record #{i}"

    def record(self, i: int) -> dict[str, Any]:
        """Record `i`, parsed.

        Raises:
            SkipRecord("bad_json"): the line is not valid JSON.
            SkipRecord("malformed"): it is not a JSON object.
        """
        return parse_record(self._lines[i])

    def line(self, i: int) -> bytes:
        """Record `i` as its JSON bytes (what a worker process is sent)."""
        return self._lines[i]


def parse_record(line: bytes) -> dict[str, Any]:
    """One annotation record from its JSON bytes.

    Raises:
        SkipRecord("bad_json"): the line is not valid JSON.
        SkipRecord("malformed"): it is not a JSON object.
    """
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise SkipRecord("bad_json", f"invalid JSON: {e.msg}") from None
    if not isinstance(record, dict):
        raise SkipRecord("malformed", f"expected a JSON object, got {type(record).__name__}")
    return record


# ----------------------------------------------------------------------------- the loader


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


WORKER_TYPES = ("threads", "processes")
_worker_loader = None  # in a worker process: its copy of the loader


def _start_worker(loader_bytes: bytes) -> None:
    global _worker_loader
    _worker_loader = pickle.loads(loader_bytes)


def _load_in_worker(line: bytes):
    return _worker_loader.load_record(parse_record(line))


class RecordLoader:
    """Static-shape batches from a JSON/JSONL annotation file + an image folder: the order,
    host shares, resumable position, workers and skip counting that every record
    format shares. Subclasses say how a record becomes a row (`load_record`) and rows a
    batch (`_collate`).

    Attributes:
        stats: counters for this host: `examples` (records used), `batches`, `truncated`
            (rows cut to max_length) and `skipped_<reason>` per `SKIP_REASONS`. A bad record
            is counted each time an epoch reaches it.
        records_per_epoch: records in this host's share of one epoch (before skipping).
    """

    def __init__(
        self,
        annotations: str | Path,
        image_folder: str | Path | None,
        *,
        batch_size: int,
        max_length: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        num_workers: int = 8,
        worker_type: str = "threads",
        prefetch: int | None = None,
        strict: bool = False,
    ):
        """See `TrainDataLoader` for the arguments (all but its processor and template)."""
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if not 0 <= process_index < process_count:
            raise VipLlavaError(f"process_index {process_index} not in [0, {process_count})")
        if batch_size < 1:
            raise VipLlavaError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise VipLlavaError(f"num_workers must be >= 0, got {num_workers}")
        if worker_type not in WORKER_TYPES:
            raise VipLlavaError(f"worker_type must be one of {WORKER_TYPES}, got {worker_type!r}")
        self.annotations = Annotations(annotations, strict=strict)
        self.image_folder = Path(image_folder) if image_folder else self.annotations.path.parent
        self.batch_size, self.max_length = batch_size, max_length
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.num_workers, self.worker_type, self.strict = num_workers, worker_type, strict
        self.prefetch = max(prefetch or 2 * batch_size, num_workers, 1)
        self.records_per_epoch = len(range(process_index, len(self.annotations), process_count))
        if self.records_per_epoch == 0:
            raise VipLlavaError(
                f"{self.annotations.path} has {len(self.annotations)} records: none for host "
                f"{process_index} of {process_count}"
            )
        self.stats = self._zero_stats()
        self._epoch, self._index = 0, 0

    def load_record(self, record: dict[str, Any]) -> tuple[Any, np.ndarray]:
        """A parsed record as (row with a `truncated` attribute, preprocessed image); raises
        `SkipRecord`. Runs in the workers."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        """What a worker process gets: no annotations (it is sent one line per job)."""
        return {**self.__dict__, "annotations": None}

    def _collate(self, rows: list[tuple[Any, np.ndarray]]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _image(self, record: dict[str, Any], preprocess) -> np.ndarray:
        """The record's one image, read from the image folder and preprocessed."""
        image = record.get("image")
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        if not image:
            raise SkipRecord("no_image", "the record has no image (text-only is not supported)")
        if not isinstance(image, str):
            raise SkipRecord("malformed", f"'image' must be one file name, got {image!r}")
        path = self.image_folder / image
        try:
            return preprocess(load_image(path))
        except Exception as e:  # noqa: BLE001 - missing, truncated or undecodable files
            raise SkipRecord("bad_image", f"cannot read image {path}: {e}") from None

    @staticmethod
    def _zero_stats() -> dict[str, int]:
        keys = ["examples", "batches", "truncated", *(f"skipped_{r}" for r in SKIP_REASONS)]
        return dict.fromkeys(keys, 0)

    # -- order and position

    def order(self, epoch: int) -> np.ndarray:
        """Record indices (into the annotation file) this host reads in `epoch`, in order."""
        n = len(self.annotations)
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            perm = np.arange(n)
        return perm[self.process_index :: self.process_count]

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch yielded, with the stats (JSON-serializable)."""
        return {
            "epoch": self._epoch, "index": self._index, "seed": self.seed,
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
            if key in state and state[key] != getattr(self, key):
                raise VipLlavaError(
                    f"the data state was saved with {key}={state[key]}, this loader has "
                    f"{getattr(self, key)}"
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
        """This host's records from the current position on, each as (record index, epoch,
        index) where (epoch, index) is the position after it."""
        epoch, index = self._epoch, self._index
        while self.num_epochs is None or epoch < self.num_epochs:
            order = self.order(epoch)
            for i in range(index, len(order)):
                after = (epoch, i + 1) if i + 1 < len(order) else (epoch + 1, 0)
                yield int(order[i]), *after
            epoch, index = epoch + 1, 0

    # -- loading

    def _load(self, i: int):
        return self.load_record(self.annotations.record(i))

    def _start_workers(self):
        """(executor, submit): `submit(i)` -> the Future of record `i`'s row and image."""
        if not self.num_workers:
            pool = _InlineExecutor()
        elif self.worker_type == "threads":
            pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, "vipllava-data")
        else:  # "spawn": a forked child of a process running JAX's threads can deadlock
            try:
                state = pickle.dumps(self)
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                raise VipLlavaError(f"worker_type='processes': this loader cannot be sent to "
                                    f"worker processes ({e}); use worker_type='threads'") from None
            pool = concurrent.futures.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker, initargs=(state,))
            return pool, lambda i: pool.submit(_load_in_worker, self.annotations.line(i))
        return pool, lambda i: pool.submit(self._load, i)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pool, submit = self._start_workers()
        positions = self._positions()
        pending: collections.deque = collections.deque()

        def submit_next() -> None:
            for i, epoch, index in positions:
                pending.append((i, epoch, index, submit(i)))
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
                    if self.strict and e.reason in STRICT_REASONS:
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
                if len(rows) == self.batch_size:
                    self._epoch, self._index = epoch, index
                    self.stats["batches"] += 1
                    batch, rows = self._collate(rows), []
                    yield batch
            if self.num_epochs is not None:
                self._epoch, self._index = self.num_epochs, 0
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


class TrainDataLoader(RecordLoader):
    """Static-shape training batches from a LLaVA-format dataset; see the module docstring.

    Iterating yields dicts of numpy arrays `input_ids`, `attention_mask`, `labels` [B, L] int32
    and `pixel_values` [B, 3, H, W] float32 (B = `batch_size`, L = `max_length`). Iteration
    starts at the loader's current position; breaking out and iterating again continues after
    the last batch yielded. A final partial batch of a finite run is dropped. `stats` and
    `records_per_epoch` as in `RecordLoader`.
    """

    def __init__(
        self,
        annotations: str | Path,
        image_folder: str | Path | None,
        processor: VipLlavaProcessor,
        *,
        batch_size: int,
        max_length: int,
        template: str = "vipllava",
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        num_workers: int = 8,
        worker_type: str = "threads",
        prefetch: int | None = None,
        strict: bool = False,
    ):
        """Reads the annotations (not the images) and checks the arguments.

        Args:
            annotations: a JSON list or JSONL file of LLaVA records.
            image_folder: the folder `record["image"]` is relative to (default: the
                annotation file's folder).
            processor: tokenizer, image token expansion and image preprocessing.
            batch_size: rows per batch on this host.
            max_length: L, the padded (and truncated) sequence length.
            template: "vipllava" (the model card's format) or "llava_v1" (ViP-LLaVA's).
            seed: shuffling seed; the order of epoch e depends on (seed, e) only.
            shuffle: False keeps the file order.
            num_epochs: stop after this many passes; None repeats forever (use a fixed step
                count then, so that all hosts take the same number of batches).
            process_index, process_count: this host and the number of hosts (default
                `jax.process_index()` and `jax.process_count()`).
            num_workers: loader workers; 0 loads in the consuming thread.
            worker_type: "threads" or "processes" (spawned; each gets a pickled copy of the
                loader without the annotations; see the module docstring for when they pay).
            prefetch: records loaded ahead of the consumer (default `2 * batch_size`, at least
                `num_workers`).
            strict: raise on bad JSON, malformed records and unreadable images instead of
                skipping them.

        Raises:
            VipLlavaError: bad arguments, an unreadable annotation file, or (strict) a bad line.
        """
        if max_length <= processor.num_image_tokens:
            raise VipLlavaError(
                f"max_length={max_length} leaves no room next to "
                f"{processor.num_image_tokens} image tokens"
            )
        super().__init__(
            annotations, image_folder, batch_size=batch_size, max_length=max_length, seed=seed,
            shuffle=shuffle, num_epochs=num_epochs, process_index=process_index,
            process_count=process_count, num_workers=num_workers, worker_type=worker_type,
            prefetch=prefetch, strict=strict,
        )
        self.processor = processor
        self.encoder = ConversationEncoder(processor, template)

    def load_record(self, record: dict[str, Any]) -> tuple[Example, np.ndarray]:
        """A parsed record: the `Example` fitted to max_length and its preprocessed image
        [3, H, W] float32. Runs in the workers.

        Raises:
            SkipRecord: the record cannot be used.
        """
        if not record.get("image"):
            raise SkipRecord("no_image", "the record has no image (text-only is not supported)")
        example = self.encoder(record.get("conversations"))
        example = fit_length(example, self.max_length, self.processor.num_image_tokens)
        return example, self._image(record, self.processor.image_processor.preprocess)

    def _collate(self, rows: list[tuple[Example, np.ndarray]]) -> dict[str, np.ndarray]:
        return collate_examples(rows, self.max_length, self.processor.pad_token_id)


def collate_examples(
    rows: Sequence[tuple[Example, np.ndarray]], length: int, pad_token_id: int
) -> dict[str, np.ndarray]:
    """(Example, pixel_values [3, H, W]) rows -> a training batch: `input_ids`, `attention_mask`
    and `labels` [B, length], right-padded (the examples must fit), and `pixel_values`."""
    shape = (len(rows), length)
    batch = {
        "input_ids": np.full(shape, pad_token_id, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
        "labels": np.full(shape, IGNORE_INDEX, np.int32),
    }
    for b, (example, _) in enumerate(rows):
        n = len(example.input_ids)
        batch["input_ids"][b, :n] = example.input_ids
        batch["attention_mask"][b, :n] = 1
        batch["labels"][b, :n] = example.labels
    batch["pixel_values"] = np.stack([pixels for _, pixels in rows]).astype(np.float32)
    return batch


# ----------------------------------------------------------------------------- image captions


@dataclasses.dataclass(frozen=True)
class CaptionExample:
    labels: np.ndarray  # [T] int32: the caption's tokens, then EOS (cut to max_length)
    truncated: bool = False


class CaptionDataLoader(RecordLoader):
    """Image-caption pairs for an encoder-decoder captioner (`vipllava_jax.models.ved`).

    One record per JSONL line (or JSON list item): `{"image": "0001.png", "caption": "..."}`
    (`"text"` is accepted in place of `"caption"`, as OCR sets name it). Iterating yields
    `pixel_values` [B, 3, H, W] float32 and `labels` [B, L] int32: the caption's tokens (no
    special tokens) followed by `eos_token_id`, -100 after. A longer caption is cut to L
    (counted in `stats["truncated"]`). The model makes its decoder input by shifting the
    labels right from `decoder_start_token_id`, as transformers' VisionEncoderDecoderModel
    does, so nothing else is needed. Order, host shares, resuming and skipping: `RecordLoader`.
    """

    def __init__(self, annotations: str | Path, image_folder: str | Path | None, tokenizer,
                 preprocess, *, eos_token_id: int, batch_size: int, max_length: int, **kwargs):
        """Args:
            tokenizer: a transformers fast tokenizer (its Rust tokenizer is copied, so that
                worker threads can share it).
            preprocess: PIL RGB image -> `[3, H, W]` float32 (the model's image processor).
            eos_token_id: appended to every caption, so that the model learns to stop.
            kwargs: `RecordLoader`'s (seed, shuffle, num_workers, strict, ...).
        """
        from tokenizers import Tokenizer

        super().__init__(annotations, image_folder, batch_size=batch_size, max_length=max_length, **kwargs)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise VipLlavaError("caption data needs a fast (tokenizers) tokenizer")
        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.preprocess, self.eos_token_id = preprocess, eos_token_id

    def load_record(self, record: dict[str, Any]) -> tuple[CaptionExample, np.ndarray]:
        caption = record.get("caption", record.get("text"))
        if not isinstance(caption, str) or not caption.strip():
            raise SkipRecord("malformed", "the record has no non-empty 'caption' string")
        ids = self._tokenizer.encode(caption, add_special_tokens=False).ids + [self.eos_token_id]
        example = CaptionExample(np.asarray(ids[: self.max_length], np.int32), len(ids) > self.max_length)
        return example, self._image(record, self.preprocess)

    def _collate(self, rows: list[tuple[CaptionExample, np.ndarray]]) -> dict[str, np.ndarray]:
        labels = np.full((len(rows), self.max_length), IGNORE_INDEX, np.int32)
        for b, (example, _) in enumerate(rows):
            labels[b, : len(example.labels)] = example.labels
        return {"labels": labels, "pixel_values": np.stack([p for _, p in rows]).astype(np.float32)}

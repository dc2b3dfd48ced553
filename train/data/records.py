"""Annotation files: JSON lists or JSONL files of records, read once and parsed on demand, and
the `SkipRecord` error that says why a record cannot be used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vipllava_jax import storage
from vipllava_jax.errors import VipLlavaError

# Why a record was skipped; loaders count each as `skipped_<reason>`. The STRICT_REASONS are
# data errors that `strict=True` turns into exceptions.
# "bad_region": a region record's box outside the image, a malformed polygon, or a `<bbox>`
# placeholder without its region.
SKIP_REASONS = (
    "bad_json", "malformed", "bad_image", "bad_region", "no_image", "image_truncated", "no_targets",
)
STRICT_REASONS = frozenset(("bad_json", "malformed", "bad_image", "bad_region"))


class SkipRecord(Exception):
    """A record that cannot be used; `reason` is one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # crosses from worker processes intact
        return SkipRecord, (self.reason, str(self))


class Annotations:
    """The records of a JSON list or JSONL file, kept as compact JSON bytes, parsed on demand.

    Attributes:
        path: the file (`storage.path`: a pathlib.Path, or an epath.Path for `gs://`).
        jsonl: whether it is JSONL (one record per line) rather than a JSON list.
    """

    def __init__(self, path: str | Path, *, strict: bool = False):
        """Reads `path` (local or `gs://`; a remote read is retried on transient errors); blank
        JSONL lines are ignored.

        Raises:
            VipLlavaError: the file does not exist, a JSON list file does not parse, or (with
                `strict`) a JSONL line does not parse (the message names the line).
        """
        self.path = storage.path(path)
        try:
            raw = storage.read_bytes(self.path)
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

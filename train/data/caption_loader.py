"""`CaptionDataLoader`: image-caption pairs -> encoder-decoder captioner training batches."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.nn.losses import IGNORE_INDEX
from vipllava_jax.train.data.loader import LoaderOptions, RecordLoader
from vipllava_jax.train.data.records import SkipRecord


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

    def __init__(
        self,
        annotations: str | Path,
        image_folder: str | Path | None,
        tokenizer,
        preprocess,
        options: LoaderOptions | None = None,
        *,
        eos_token_id: int,
        **fields: Any,
    ):
        """Args:
            annotations, image_folder: as `RecordLoader`'s (local or `gs://`).
            tokenizer: a transformers fast tokenizer (its Rust tokenizer is copied, so that
                worker threads can share it).
            preprocess: PIL RGB image -> `[3, H, W]` float32 (the model's image processor).
            options: batch size, max_length, order, hosts, workers, strictness.
            eos_token_id: appended to every caption, so that the model learns to stop.
            fields: `LoaderOptions` fields replacing those of `options`.
        """
        from tokenizers import Tokenizer

        super().__init__(annotations, image_folder, options, **fields)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise VipLlavaError("caption data needs a fast (tokenizers) tokenizer")
        self._tokenizer = Tokenizer.from_str(backend.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.preprocess, self.eos_token_id = preprocess, eos_token_id

    def load_record(
        self, record: dict[str, Any], position: tuple[int, int] = (0, 0)
    ) -> tuple[CaptionExample, np.ndarray]:
        caption = record.get("caption", record.get("text"))
        if not isinstance(caption, str) or not caption.strip():
            raise SkipRecord("malformed", "the record has no non-empty 'caption' string")
        max_length = self.options.max_length
        ids = self._tokenizer.encode(caption, add_special_tokens=False).ids + [self.eos_token_id]
        example = CaptionExample(np.asarray(ids[:max_length], np.int32), len(ids) > max_length)
        return example, self._image(record, self.preprocess)

    def _collate(self, rows: list[tuple[CaptionExample, np.ndarray]]) -> dict[str, np.ndarray]:
        labels = np.full((len(rows), self.options.max_length), IGNORE_INDEX, np.int32)
        for b, (example, _) in enumerate(rows):
            labels[b, : len(example.labels)] = example.labels
        return {"labels": labels, "pixel_values": np.stack([p for _, p in rows]).astype(np.float32)}

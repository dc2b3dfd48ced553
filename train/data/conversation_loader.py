"""`TrainDataLoader`: LLaVA-format conversations + an image folder -> VipLlava training batches."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.nn.losses import IGNORE_INDEX
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.regions import RegionError, has_regions, mark_record
from vipllava_jax.train.data.conversations import ConversationEncoder, Example, fit_length
from vipllava_jax.train.data.loader import LoaderOptions, RecordLoader
from vipllava_jax.train.data.records import SkipRecord


class TrainDataLoader(RecordLoader):
    """Static-shape training batches from a LLaVA-format dataset.

    Each record becomes one row (`conversations.ConversationEncoder`, then cut to max_length by
    `fit_length`). Iterating yields dicts of numpy arrays:

    - `input_ids`, `labels` [B, L] int32 (B = `batch_size`, L = `max_length`);
    - `attention_mask` [B, L] int32; rows are padded on the RIGHT to `max_length`
      (`pad_token_id`, labels -100), which is what causal training wants; generation uses left
      padding instead;
    - `pixel_values` [B, 3, H, W] float32: the record's one image, preprocessed by the
      processor's image processor (build it with `pad_to_square=True` for ViP-LLaVA's
      expand2square).

    Region records (ViP-LLaVA-Instruct's: `bboxes`, optional COCO `segmentations`, `<bbox>` /
    `<bboxN>` placeholders, or v7w / pointQA_twice questions; see `processing.regions`) have
    their markers drawn on the image as it is read, and their placeholders replaced by the
    drawn markers' phrases. The shapes and colours come from the seed, the epoch and the
    record's index, so a resumed run draws the same markers; a box outside the image, a
    malformed polygon or a placeholder without its region skips the record (`bad_region`).

    Records without an image are skipped (text-only training is not supported). A row longer
    than `max_length` is truncated (`stats["truncated"]`) unless the cut would fall inside or
    before the image tokens, or remove every labelled token; those records are skipped. Order,
    host shares, resuming, workers and skipping: `RecordLoader`.
    """

    def __init__(
        self,
        annotations: str | Path,
        image_folder: str | Path | None,
        processor: VipLlavaProcessor,
        options: LoaderOptions | None = None,
        *,
        template: str = "vipllava",
        **fields: Any,
    ):
        """Reads the annotations (not the images) and checks the arguments.

        Args:
            annotations: a JSON list or JSONL file of LLaVA records, local or `gs://`.
            image_folder: the folder `record["image"]` is relative to, local or `gs://`
                (default: the annotation file's folder).
            processor: tokenizer, image token expansion and image preprocessing.
            options: batch size, max_length, order, hosts, workers, strictness.
            template: "vipllava" (the model card's format) or "llava_v1" (ViP-LLaVA's).
            fields: `LoaderOptions` fields replacing those of `options`.

        Raises:
            VipLlavaError: bad arguments, an unreadable annotation file, or (strict) a bad line.
        """
        options = LoaderOptions.merge(options, **fields)
        if options.max_length <= processor.num_image_tokens:
            raise VipLlavaError(
                f"max_length={options.max_length} leaves no room next to "
                f"{processor.num_image_tokens} image tokens"
            )
        super().__init__(annotations, image_folder, options)
        self.processor = processor
        self.encoder = ConversationEncoder(processor, template)

    def load_record(
        self, record: dict[str, Any], position: tuple[int, int] = (0, 0)
    ) -> tuple[Example, np.ndarray]:
        """A parsed record: the `Example` fitted to max_length and its preprocessed image
        [3, H, W] float32; `position` (epoch, record index) seeds a region record's markers.
        Runs in the workers.

        Raises:
            SkipRecord: the record cannot be used.
        """
        if not record.get("image"):
            raise SkipRecord("no_image", "the record has no image (text-only is not supported)")
        preprocess = self.processor.image_processor.preprocess
        if not has_regions(record):
            example = self._fit(record.get("conversations"))
            return example, self._image(record, preprocess)
        drawn = {}

        def mark(image):
            try:
                drawn["image"], drawn["conversations"] = mark_record(
                    record, image, self.record_rng(position), image_folder=self.image_folder)
            except RegionError as e:
                raise SkipRecord("bad_region", str(e)) from None
            return drawn["image"]

        pixels = self._image(record, preprocess, mark)
        return self._fit(drawn["conversations"]), pixels

    def _fit(self, conversations: Any) -> Example:
        example = self.encoder(conversations)
        return fit_length(example, self.options.max_length, self.processor.num_image_tokens)

    def _collate(self, rows: list[tuple[Example, np.ndarray]]) -> dict[str, np.ndarray]:
        return collate_examples(rows, self.options.max_length, self.processor.pad_token_id)


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

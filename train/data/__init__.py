"""Training data: annotation records + an image folder -> static-shape numpy batches.

Input: a JSON list or a JSONL file of records, e.g. ViP-LLaVA's training sets::

    {"id": "...", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the red box?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

or image-caption pairs (`{"image": "0001.png", "caption": "..."}`) for a captioner.

Region records, as ViP-LLaVA-Instruct has them (and the format for your own regions), mark the
image while it is read::

    {"id": "refcocog-gpt4v-7", "image": "coco/0001.jpg",
     "bboxes": [[x0, y0, x1, y1]],                       # pixels of the image as stored
     "segmentations": [[[x, y, x, y, ...]]],             # optional COCO polygons (or null) per box
     "conversations": [{"from": "human", "value": "What is the object <bbox>?"}, ...]}

The id's prefix (refcocog, vcr, vg_rel, flickr30k, v7w, pointQA_twice; anything else draws as
refcocog) picks the marker shapes and style; `<bbox>` / `<bboxN>` become the drawn marker's
phrase ("within the red rectangle"). v7w, pointQA_twice, vg_rel and flickr30k records without
conversations get the original's questions. The rules: `vipllava_jax.processing.regions`.

    records.py             annotation files, record parsing, `SkipRecord` and its reasons
    conversations.py       LLaVA conversations -> input_ids and labels (`ConversationEncoder`)
    workers.py             the pool that loads records ahead of the consumer (threads/processes)
    loader.py              `LoaderOptions`, and `RecordLoader`: order, host shares, resuming
    conversation_loader.py `TrainDataLoader`: conversations -> VipLlava batches
    caption_loader.py      `CaptionDataLoader`: image-caption pairs -> captioner batches

Every loader takes one `LoaderOptions` (batch_size, max_length, seed, workers, ...). Records
that cannot be used are skipped and counted in `loader.stats` (`skipped_<reason>`, reasons in
`SKIP_REASONS`); with `strict=True` the data errors (bad JSON, malformed record, unreadable
image) raise `VipLlavaError` naming the line instead.

The workers could come from grain, but it would add array-record, protobuf, etils, absl and
cloudpickle for features (sharding, seeded shuffle, resumable position, worker processes) that
take a few lines here.
"""

from vipllava_jax.nn.losses import IGNORE_INDEX
from vipllava_jax.train.data.caption_loader import CaptionDataLoader, CaptionExample
from vipllava_jax.train.data.conversation_loader import TrainDataLoader, collate_examples
from vipllava_jax.train.data.conversations import (
    ASSISTANT_ROLES,
    USER_ROLES,
    ConversationEncoder,
    Example,
    conversation_prompt,
    fit_length,
    normalize_conversation,
)
from vipllava_jax.train.data.loader import LoaderOptions, RecordLoader
from vipllava_jax.train.data.records import (
    SKIP_REASONS,
    STRICT_REASONS,
    Annotations,
    SkipRecord,
    parse_record,
)
from vipllava_jax.train.data.workers import WORKER_TYPES

__all__ = [
    "ASSISTANT_ROLES", "IGNORE_INDEX", "SKIP_REASONS", "STRICT_REASONS", "USER_ROLES", "WORKER_TYPES",
    "Annotations", "CaptionDataLoader", "CaptionExample", "ConversationEncoder", "Example",
    "LoaderOptions", "RecordLoader", "SkipRecord", "TrainDataLoader", "collate_examples",
    "conversation_prompt", "fit_length", "normalize_conversation", "parse_record",
]

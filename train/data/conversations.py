"""LLaVA conversations -> token ids and labels.

A record's `conversations` become one `Example`:

- `input_ids`: the chat prompt (`prompts.TEMPLATES`, "vipllava" or "llava_v1") tokenized as one
  string, exactly as `VipLlavaProcessor` tokenizes it at inference, with the `<image>`
  placeholder expanded to `num_image_tokens` image tokens. The placeholder is moved to the start
  of the first question, as LLaVA's `preprocess_multimodal` does.
- `labels`: IGNORE_INDEX (-100) everywhere except each assistant answer and the separator that
  closes it (`###` for "vipllava", `</s>` for "llava_v1"), as ViP-LLaVA trains, and the space
  before the answer (sentencepiece folds it into the answer's first token, `▁A`; at inference
  the prompt ends at `{assistant}:` and the model writes it). Labels are not shifted (the
  model's loss predicts `labels[t + 1]` at `t`). A token is labelled when its character span
  (tokenizer offsets) overlaps such a span, so the boundaries are those of the real
  tokenization; a token that straddles a boundary is labelled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.nn.losses import IGNORE_INDEX
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import TEMPLATES
from vipllava_jax.train.data.records import SkipRecord

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


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

"""Evaluation on a LLaVA-format question set: batched greedy answers, scores, a table.

    records (JSON/JSONL: first human turn = question, first gpt turn = reference)
      --VipLlavaProcessor (the model folder's tokenizer)--> left-padded batches
      --model.generate (greedy)--> answers, cut at the template's separator
      --score--> exact match after normalising (strip, lowercase, trailing period), or, when
                 the reference is a single letter A-D, the prediction's first letter
      --summarize--> accuracy overall, per `category`, and per `pair` (records sharing a pair
                 id, e.g. the marked twins of the synthetic task: right only if all are right)

Works for any converted checkpoint: everything model-specific comes from its folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vipllava_jax.errors import VipLlavaError

LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    image: str  # path, resolved against the image folder
    question: str  # without the <image> placeholder
    reference: str
    category: str = "all"
    pair: str | None = None


def normalize(text: str) -> str:
    """Exact-match form: stripped, lowercased, without trailing periods."""
    return text.strip().lower().rstrip(".").strip()


def is_letter_reference(reference: str) -> bool:
    """A multiple-choice reference: one letter A-D (optionally "B." or "(B)")."""
    return re.fullmatch(r"\(?([A-Da-d])[.)]?", reference.strip()) is not None


def score(prediction: str, reference: str) -> bool:
    """Exact match after `normalize`; for a letter reference, the prediction's first letter."""
    if is_letter_reference(reference):
        want = re.search(r"[A-Da-d]", reference).group(0).upper()
        first = re.search(r"[A-Za-z]", prediction)
        return first is not None and first.group(0).upper() == want
    return normalize(prediction) == normalize(reference)


def load_questions(
    path: str | Path, image_folder: str | Path | None = None, image_token: str = "<image>"
) -> list[Question]:
    """The first question/answer turn of each record of a LLaVA-format JSON or JSONL file.

    Args:
        path: the file; `image` paths are relative to `image_folder` (default: its folder).

    Raises:
        VipLlavaError: unreadable file, or a record without an image or a question/answer pair
            (the message names the record).
    """
    path = Path(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    try:
        raw = path.read_text()
    except OSError as e:
        raise VipLlavaError(f"cannot read {path}: {e}") from None
    try:
        if raw.lstrip().startswith("["):
            records = json.loads(raw)
        else:
            records = [json.loads(line) for line in raw.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise VipLlavaError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(records, list):
        raise VipLlavaError(f"{path}: expected a list of records, got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        conv = r.get("conversations") if isinstance(r, dict) else None
        if conv is not None and not (
            isinstance(conv, list) and all(isinstance(m, dict) and isinstance(m.get("value"), str)
                                           for m in conv)
        ):
            raise VipLlavaError(
                f"{path} record {i}: conversations must be a list of {{\"from\": ..., \"value\": "
                f"str}} turns, got {json.dumps(conv)[:60]}"
            )
        human = next((m["value"] for m in conv or [] if m.get("from") in ("human", "user")), None)
        gpt = next((m["value"] for m in conv or [] if m.get("from") in ("gpt", "assistant")), None)
        if human is None or gpt is None or not r.get("image"):
            raise VipLlavaError(f"{path} record {i}: needs an image and a human/gpt turn")
        out.append(Question(
            id=str(r.get("id", i)), image=str(folder / r["image"]),
            question=human.replace(image_token, "").strip(), reference=gpt,
            category=str(r.get("category", "all")), pair=r.get("pair"),
        ))
    return out


def summarize(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of scored predictions (dicts with `correct`, `category`, optional `pair`).

    Returns:
        `{"accuracy", "correct", "total", "categories": {name: {"accuracy", "correct",
        "total"}}, "pairs": {...} or None}`; a pair counts when it has >= 2 records and is
        right when all of them are.
    """
    rows = list(rows)
    if not rows:
        raise VipLlavaError("nothing to summarize: no predictions")

    def acc(correct: int, total: int) -> dict[str, Any]:
        return {"accuracy": correct / total, "correct": correct, "total": total}

    cats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    pairs: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        c = cats[r.get("category", "all")]
        c[0] += bool(r["correct"])
        c[1] += 1
        if r.get("pair") is not None:
            pairs[r["pair"]].append(bool(r["correct"]))
    full = [v for v in pairs.values() if len(v) >= 2]
    return {
        **acc(sum(bool(r["correct"]) for r in rows), len(rows)),
        "categories": {k: acc(*cats[k]) for k in sorted(cats)},
        "pairs": acc(sum(all(v) for v in full), len(full)) if full else None,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a plain-text table (per category, overall, pairs)."""
    lines = [f"{'category':<12} {'n':>6} {'accuracy':>9}"]
    for name, c in summary["categories"].items():
        lines.append(f"{name:<12} {c['total']:>6} {100 * c['accuracy']:>8.1f}%")
    lines.append(f"{'all':<12} {summary['total']:>6} {100 * summary['accuracy']:>8.1f}%")
    if summary["pairs"]:
        p = summary["pairs"]
        lines.append(f"{'pairs':<12} {p['total']:>6} {100 * p['accuracy']:>8.1f}%  (every record of the pair right)")
    return "\n".join(lines)


def generate_answers(
    model, processor, questions: Sequence[str], images: Sequence[Any], *, batch_size: int = 32,
    max_new_tokens: int = 16, template: str = "vipllava", progress: bool = False,
) -> list[str]:
    """Greedy answers to `questions[i]` about `images[i]` (paths, PIL images or arrays).

    Each batch is padded to `batch_size` questions (repeating the last one) so every batch
    reuses one compiled program. Generation stops at EOS or at the template's separator when
    that is one token ("###" for "vipllava"); the text is cut at the separator in any case.
    """
    from vipllava_jax.processing.images import load_image
    from vipllava_jax.processing.prompts import build_prompt, cut_answer, stop_tokens

    if len(questions) != len(images):
        raise VipLlavaError(f"{len(questions)} questions but {len(images)} images")
    eos, stops = stop_tokens(processor.tokenizer, template)
    answers = []
    starts = range(0, len(questions), batch_size)
    if progress:
        from tqdm import tqdm  # the terminal bar (tqdm.auto wants ipywidgets in notebooks)

        starts = tqdm(starts, desc="answering", unit="batch", file=sys.stderr)
    for start in starts:
        texts = list(questions[start : start + batch_size])
        ims = list(images[start : start + batch_size])
        n = len(texts)
        texts += [texts[-1]] * (batch_size - n)
        ims += [ims[-1]] * (batch_size - n)
        inputs = processor(
            text=[build_prompt(q, template=template) for q in texts],
            images=[load_image(im) for im in ims],
        )
        seqs = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
            pad_token_id=processor.pad_token_id,
        )
        new = seqs[:n, inputs["input_ids"].shape[1]:]
        answers += [cut_answer(t, stops) for t in processor.batch_decode(new, skip_special_tokens=False)]
    pad = processor.tokenizer.pad_token
    return [a.replace(pad, "").strip() if pad else a for a in answers]


def evaluate(
    model_dir: str | Path, data: str | Path, *, image_folder: str | Path | None = None,
    batch_size: int = 32, max_new_tokens: int = 16, template: str = "vipllava",
    dtype: str = "float32", limit: int | None = None, out: str | Path | None = None,
    model=None, processor=None, progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answers every question of `data` with the model in `model_dir` and scores them.

    Args:
        model_dir: an Orbax folder (or HF folder) holding the tokenizer files.
        data: LLaVA-format JSON/JSONL; `limit` keeps its first N records.
        out: if given, the predictions are written there as JSONL.
        model, processor: already loaded ones (then `model_dir` is not read).
        progress: show a progress bar (batches) on stderr.

    Raises:
        VipLlavaError: bad arguments or data, or an `out` that cannot be written (checked
            before any answer is computed).

    Returns:
        (`summarize`'s dict, the prediction rows).
    """
    from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration
    from vipllava_jax.processing.processor import VipLlavaProcessor

    if limit is not None and limit < 1:
        raise VipLlavaError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise VipLlavaError(f"batch_size must be >= 1, got {batch_size}")
    if out is not None:  # fail before the work, not after it
        out = Path(out)
        if out.is_dir():
            raise VipLlavaError(f"--out {out} is a folder; give a file name")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            open(out, "a").close()
        except OSError as e:
            raise VipLlavaError(f"cannot write the predictions to {out}: {e}") from None
    questions = load_questions(data, image_folder)[:limit]
    processor = processor or VipLlavaProcessor.from_pretrained(model_dir)
    model = model or VipLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    predictions = generate_answers(
        model, processor, [q.question for q in questions], [q.image for q in questions],
        batch_size=min(batch_size, len(questions)),
        max_new_tokens=max_new_tokens, template=template, progress=progress,
    )
    rows = [
        {"id": q.id, "category": q.category, "pair": q.pair, "question": q.question,
         "reference": q.reference, "prediction": p, "correct": score(p, q.reference)}
        for q, p in zip(questions, predictions)
    ]
    if out is not None:
        with open(out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return summarize(rows), rows

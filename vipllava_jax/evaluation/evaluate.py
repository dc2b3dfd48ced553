"""Evaluation on a question set: batched greedy answers, scores, a table.

Three input formats, told apart by the first record's keys (`detect_format`):

- "llava": `conversations` (first human turn = question, first gpt turn = reference);
- "vip-bench": ViP-Bench's `questions.jsonl` (`question_id`, `image`, `text`: a question about an
  already-marked image, no reference); the answers are written as LLaVA's `model_vqa` writes
  them (`question_id`, `prompt`, `text`, `answer_id`, `model_id`, `metadata`), which is what
  ViP-Bench's grader reads; nothing is scored here;
- "regions": ViP-LLaVA-Instruct's v7w / pointQA_twice records (`id`, `image`, `bboxes`,
  `question`, `answer`, no conversations): each is marked on the fly by
  `processing.regions.mark_record` (its own seed) into a question and a reference (a letter for
  v7w), then scored as the "llava" format.

    records
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
import os
import re
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vipllava_jax import storage
from vipllava_jax.errors import VipLlavaError

LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    image: str  # path or gs:// URL, resolved against the image folder
    question: str  # without the <image> placeholder
    reference: str
    category: str = "all"
    pair: str | None = None
    question_id: Any = None  # ViP-Bench's id, written back as given
    record: dict[str, Any] | None = None  # a region record, marked when its image is loaded
    seed: tuple[int, int] = (0, 0)  # a region record's markers: (run seed, record index)


FORMATS = ("llava", "vip-bench", "regions")
REGION_DATASETS = ("v7w", "pointQA_twice")


def detect_format(record: Any) -> str:
    """The question-set format of a file, from its first record's keys (see the module doc)."""
    from vipllava_jax.processing.regions import dataset_of

    if not isinstance(record, dict):
        return "llava"
    if "question_id" in record and "text" in record and "conversations" not in record:
        return "vip-bench"
    if "bboxes" in record and not record.get("conversations") and dataset_of(record) in REGION_DATASETS:
        return "regions"
    return "llava"


def letter_of(text: str) -> str | None:
    """The letter a multiple-choice answer gives, as `score` reads it: its first letter,
    uppercased (None without one)."""
    m = re.search(r"[A-Za-z]", text)
    return m.group(0).upper() if m else None


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
        return letter_of(prediction) == want
    return normalize(prediction) == normalize(reference)


def read_records(path: str | Path) -> list[Any]:
    """The records of a JSON list or JSONL file, local or `gs://` (a remote read is retried on
    transient errors).

    Raises:
        VipLlavaError: unreadable file or invalid JSON (one line).
    """
    path = storage.path(path)
    try:
        raw = storage.read_text(path)
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
    return records


def load_questions(
    path: str | Path, image_folder: str | Path | None = None, image_token: str = "<image>",
    *, limit: int | None = None, seed: int = 0,
) -> list[Question]:
    """The questions of a question set in any of `FORMATS` (told by `detect_format`).

    Args:
        path: the file; `image` paths are relative to `image_folder` (default: its folder).
            Either may be a `gs://` URL; the images are then read from the bucket.
        limit: only the first N records.
        seed: region records are marked with `np.random.default_rng([seed, record index])`, so
            a record's markers do not depend on the others.

    Raises:
        VipLlavaError: unreadable file, or a record without what its format needs (the
            message names the record).
    """
    path = storage.path(path)
    folder = storage.path(image_folder) if image_folder is not None else path.parent
    records = read_records(path)[:limit]
    fmt = detect_format(records[0]) if records else "llava"
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise VipLlavaError(f"{path} record {i}: expected an object, got {type(r).__name__}")
        if fmt == "vip-bench":
            if not r.get("image") or not isinstance(r.get("text"), str) or "question_id" not in r:
                raise VipLlavaError(f"{path} record {i}: a ViP-Bench question needs question_id, image and text")
            out.append(Question(id=str(r["question_id"]), image=str(folder / r["image"]),
                                question=r["text"].replace(image_token, "").strip(), reference=None,
                                question_id=r["question_id"]))
            continue
        if fmt == "regions":
            if not r.get("image"):
                raise VipLlavaError(f"{path} record {i}: needs an image")
            # question and reference are filled in when the record is marked (`mark_question`)
            out.append(Question(id=str(r.get("id", i)), image=str(folder / r["image"]), question="",
                                reference="", category=str(r["id"]).split("-")[0], record=r,
                                seed=(seed, i)))
            continue
        conv = r.get("conversations")
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


def mark_question(q: Question, image_token: str = "<image>") -> tuple[Question, Any]:
    """A region question marked: `(the question with its text and reference, the marked image)`;
    other questions come back as they are, with their image path.

    Raises:
        VipLlavaError: the record's regions or fields are malformed (the message names it).
    """
    if q.record is None:
        return q, q.image
    import numpy as np

    from vipllava_jax.processing.images import load_image
    from vipllava_jax.processing.regions import mark_record

    try:
        image, conv = mark_record(q.record, load_image(q.image), np.random.default_rng(list(q.seed)))
    except VipLlavaError as e:
        raise VipLlavaError(f"record {q.id}: {e}") from None
    question = next(m["value"] for m in conv if m["from"] == "human")
    reference = next(m["value"] for m in conv if m["from"] == "gpt")
    return dataclasses.replace(q, question=question.replace(image_token, "").strip(),
                               reference=reference), image


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
    model=None, processor=None, progress: bool = False, seed: int = 0,
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Answers every question of `data` with the model in `model_dir` and scores them.

    Args:
        model_dir: an Orbax folder (or HF folder) holding the tokenizer files.
        data: a question set (JSON/JSONL) in one of `FORMATS`; `limit` keeps its first N records.
        data, image_folder: local or `gs://`.
        out: if given, the predictions are written there as JSONL (for ViP-Bench, its
            grader's answers file: one record per question, in question order), a local file
            or a `gs://` object; written once, whole, when every answer is in (a bucket gets
            no partial object; it is checked first that `out` is no folder and, remotely, that
            its bucket exists).
        seed: the markers of region records (`load_questions`).
        model, processor: already loaded ones (then `model_dir` is not read).
        progress: show a progress bar (batches) on stderr.

    Raises:
        VipLlavaError: bad arguments or data, or an `out` that cannot be written (checked
            before any answer is computed).

    Returns:
        (`summarize`'s dict, the prediction rows); for region records of multiple choice the
        rows and the summary's `letters` give each record's reference and predicted letter;
        for ViP-Bench the summary is None (its grader scores the answers).
    """
    from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration
    from vipllava_jax.processing.processor import VipLlavaProcessor

    if limit is not None and limit < 1:
        raise VipLlavaError(f"limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise VipLlavaError(f"batch_size must be >= 1, got {batch_size}")
    if out is not None:  # fail before the work, not after it
        out = check_out(out)
    questions = load_questions(data, image_folder, limit=limit, seed=seed)
    if not questions:
        raise VipLlavaError(f"{data}: no records")
    marked = [mark_question(q) for q in questions]  # region records: drawn here, once
    questions, images = [m[0] for m in marked], [m[1] for m in marked]
    processor = processor or VipLlavaProcessor.from_pretrained(model_dir)
    model = model or VipLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    predictions = generate_answers(
        model, processor, [q.question for q in questions], images,
        batch_size=min(batch_size, len(questions)),
        max_new_tokens=max_new_tokens, template=template, progress=progress,
    )
    if questions[0].question_id is not None:  # ViP-Bench: its grader's answers file, unscored
        model_id = storage.path(model_dir).name if model_dir else "vipllava"
        rows = [
            {"question_id": q.question_id, "prompt": q.question, "text": p,
             "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": {}}
            for q, p in zip(questions, predictions)
        ]
        summary = None
    else:
        rows = [
            {"id": q.id, "category": q.category, "pair": q.pair, "question": q.question,
             "reference": q.reference, "prediction": p, "correct": score(p, q.reference)}
            for q, p in zip(questions, predictions)
        ]
        for q, r in zip(questions, rows):
            if q.record is not None and is_letter_reference(q.reference):
                r["reference_letter"] = letter_of(q.reference)
                r["predicted_letter"] = letter_of(r["prediction"])
        summary = summarize(rows)
        letters = {r["id"]: (r["reference_letter"], r["predicted_letter"]) for r in rows if "reference_letter" in r}
        if letters:
            summary["letters"] = {k: {"reference": a, "predicted": b} for k, (a, b) in letters.items()}
    if out is not None:
        storage.write_text(out, "".join(json.dumps(r) + "\n" for r in rows))  # on GCS: one upload
    return summary, rows


def check_out(out: str | Path):
    """`out` as a `storage.path`, checked before any answer is computed: not a folder (a
    `gs://` prefix with objects under it counts as one); a local one is created empty (and its
    folder made), a remote one is not written until the end but its bucket must exist.

    Raises:
        VipLlavaError: a folder, or a place that cannot be written.
    """
    out = storage.path(out)
    remote = storage.is_remote(out)
    try:
        if out.is_dir() or (remote and not out.name):
            raise VipLlavaError(f"--out {out} is a folder; give a file name")
        if remote:
            bucket = storage.path("gs://" + os.fspath(out).removeprefix("gs://").split("/", 1)[0])
            if not bucket.exists():
                raise VipLlavaError(f"cannot write the predictions to {out}: no bucket {bucket}")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            open(out, "a").close()
    except OSError as e:
        raise VipLlavaError(f"cannot write the predictions to {out}: {e}") from None
    return out

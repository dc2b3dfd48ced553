"""ViP-LLaVA-Instruct region records -> a marked image and a plain LLaVA conversation.

The original's training data (`llava/visual_prompt_organizer.py`) keeps regions as boxes and
polygons and draws them while loading: each region gets a marker shape and a colour sampled per
record, the markers are blended onto the image, and the `<bbox>` / `<bboxN>` placeholders in
the text become the drawn marker's phrase ("within the red rectangle"). A record::

    {"id": "refcocog-gpt4v-12", "image": "coco/1.jpg",
     "bboxes": [[x0, y0, x1, y1], ...],                    # original-image pixels
     "segmentations": [[[x, y, x, y, ...], ...] or null, ...],   # optional COCO polygons per box
     "conversations": [{"from": "human", "value": "What is the object <bbox>?"}, ...]}

The dataset is the id's prefix before the first '-'; it picks the shapes and the style:

| dataset        | shapes                                  | style    | text                          |
|----------------|-----------------------------------------|----------|-------------------------------|
| refcocog       | all eight                               | random   | conversations, or `answer`: describe the object |
| vcr            | all but point                           | random   | conversations, or `meta_dir` + `question` / choices (below): two turns, multiple choice or direct |
| vg_rel         | rectangle, ellipse                      | random   | conversations, or `answer`: the relationship triplet question |
| flickr30k      | rectangle, ellipse, arrow               | random   | conversations, or `bbox` (boxes per entity) + `grounding` caption: the describe-the-image question |
| v7w            | rectangle                               | constant | `question`, 4 `bboxes`, `answer` box: multiple choice, letter answer |
| pointQA_twice  | rectangle (red)                         | constant | `general_question` (or `question`) and `answer`, first box |
| anything else  | all eight (refcocog's rule)             | random   | conversations                 |

Colours: per region a named colour (`COLORS`) or, with probability 0.5, a random RGB, whose
phrase has no colour word ("within the rectangle"). Regions of one record that share a shape
get distinct named colours, as the original's v7w/VCR/vg_rel sampling does, so every phrase
names one region. vg_rel, v7w and pointQA_twice regions carry no polygons (the original drops
them). Everything random comes from one `np.random.Generator`, so the same seed draws the same
markers and phrases.

Other differences from the original: "the" always precedes the colour (the original's vg_rel
leaves it out half the time); constant-style markers blend at alpha 128 (the original's
training draws v7w / pointQA_twice at a random alpha 96-255); VCR records need their meta
files: see `_vcr`.

VCR records (no `bboxes`, no `conversations`)::

    {"id": "vcr-train-1", "image": "vcr1images/movie/1.jpg",
     "meta_dir": "./dataset/vcr1images/movie/1.json",   # {"boxes": [[x0,y0,x1,y1,score],...],
                                                         #  "segms": [[[[x,y],...], ...], ...]}
     "question": ["What", "is", [0], "doing", "?"],      # [0]: object 0 of the meta file
     "answer_choices": [[...], ...], "answer_label": 2,
     "rationale_choices": [[...], ...], "rationale_label": 1,
     "class_names": ["person", "dog", ...]}

`meta_dir` is resolved as the original does (`'./dataset'` replaced by the image folder):
a leading `./dataset` becomes `image_folder`, another relative path is taken relative to
`image_folder`, an absolute path stays; without `image_folder` the path is used as given.
Every object the text refers to is drawn (its meta box without the score, its polygons of 4
points or more, in reverse order), references become "The person within the red rectangle",
and the conversation is question -> answer, why -> rationale; each turn is multiple choice
("(A) ... (B) ...", the answer "(C)"-style) or direct (the labelled choice only) with
probability 0.5, as the original's. The phrase always has "the" before the colour (the
original's drops it half the time).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from vipllava_jax.processing.region_core import (  # noqa: F401  (public here too)
    DATASETS,
    DEFAULT_DATASET,
    MULTIPLE_CHOICE_TAIL,
    PLACEHOLDER,
    SHAPE_WORDS,
    DatasetRule,
    Region,
    RegionError,
    draw_regions,
    parse_boxes,
    parse_segmentations,
    sample_regions,
)
from vipllava_jax.processing.regions_vcr import vcr_regions


def has_regions(record: dict[str, Any]) -> bool:
    """Whether the record is a region record (it has `bboxes`, or flickr30k's `bbox` and
    `grounding`), or its text has placeholders."""
    if record.get("bboxes") is not None or (record.get("grounding") is not None and record.get("bbox") is not None):
        return True
    if dataset_of(record) == "vcr" and record.get("meta_dir") and not record.get("conversations"):
        return True
    conversations = record.get("conversations")
    return isinstance(conversations, list) and any(
        isinstance(m, dict) and isinstance(m.get("value"), str) and PLACEHOLDER.search(m["value"])
        for m in conversations
    )


def dataset_of(record: dict[str, Any]) -> str:
    """The record's dataset: its id's prefix when it is a known one, else `DEFAULT_DATASET`."""
    prefix = str(record.get("id", "")).split("-")[0]
    return prefix if prefix in DATASETS else DEFAULT_DATASET


def mark_record(
    record: dict[str, Any], image: PIL.Image.Image, rng: np.random.Generator,
    image_folder: str | Path | None = None,
) -> tuple[PIL.Image.Image, list[dict[str, str]]]:
    """Draws a region record's markers and fills its text.

    Args:
        record: a ViP-LLaVA-Instruct record (see the module docstring).
        image: its image, as read (boxes are in its pixels).
        rng: all the sampling (shapes, colours, marker geometry).
        image_folder: the folder the record's image is relative to; a VCR `meta_dir` is
            resolved against it (see the module docstring).

    Returns:
        `(marked RGB image, conversations)` with every placeholder replaced.

    Raises:
        RegionError: a box or polygon is malformed or outside the image, a placeholder names a
            region the record does not have, v7w / pointQA / VCR fields are missing, or a VCR
            meta file is missing or lacks a referenced object.
    """
    dataset = dataset_of(record)
    rule = DATASETS[dataset]
    w, h = image.size
    if dataset == "vcr" and not record.get("conversations") and record.get("meta_dir"):
        regions, conversations = vcr_regions(record, rule, rng, w, h, image_folder)
        return draw_regions(image, regions, rule, rng), conversations
    if dataset == "flickr30k" and not record.get("conversations") and "grounding" in record:
        regions, conversations = _flickr30k(record, rule, rng, w, h)
        return draw_regions(image, regions, rule, rng), conversations
    boxes = parse_boxes(record.get("bboxes"), w, h)
    polygons = parse_segmentations(record.get("segmentations"), len(boxes)) if rule.keep_polygons else [None] * len(boxes)

    if dataset == "v7w" and not record.get("conversations"):
        regions = sample_regions(boxes, polygons, rule, rng)
        conversations = _v7w(record, boxes, regions)
    elif dataset == "pointQA_twice" and not record.get("conversations"):
        if not boxes:
            raise RegionError("a pointQA_twice record needs one box")
        regions = [Region(boxes[0], None, "rectangle", "red", "red")]
        conversations = _point_qa(record)
    else:
        regions = sample_regions(boxes, polygons, rule, rng)
        if dataset == "vg_rel" and not record.get("conversations"):
            conversations = _vg_rel(record, regions)
        elif dataset == "refcocog" and not record.get("conversations") and "answer" in record:
            conversations = _refcocog(record, regions, rng)
        else:
            conversations = _fill(record.get("conversations"), regions)
    return draw_regions(image, regions, rule, rng), conversations


def _fill(conversations: Any, regions: Sequence[Region]) -> Any:
    """`<bbox>` -> region 0's phrase, `<bboxN>` -> region N's, in every message."""
    if not isinstance(conversations, list):
        return conversations  # the conversation encoder says what is wrong with it

    def phrase(match: re.Match) -> str:
        n = int(match.group(1) or 0)
        if n >= len(regions):
            raise RegionError(f"{match.group(0)} names region {n}, the record has {len(regions)} box(es)")
        return regions[n].phrase

    out = []
    for m in conversations:
        if isinstance(m, dict) and isinstance(m.get("value"), str):
            m = {**m, "value": PLACEHOLDER.sub(phrase, m["value"])}
        out.append(m)
    return out


def _v7w(record, boxes, regions) -> list[dict[str, str]]:
    """The original's v7w question: the options name the drawn boxes, the answer is a letter."""
    question, answer = record.get("question"), record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, list):
        raise RegionError("a v7w record needs 'question' (text) and 'answer' (one of its boxes)")
    if not 2 <= len(boxes) <= 26:
        raise RegionError(f"a v7w record needs 2 to 26 boxes, got {len(boxes)}")
    try:
        label = [list(map(float, b)) for b in record["bboxes"]].index([float(v) for v in answer])
    except (ValueError, TypeError):
        raise RegionError(f"the v7w answer {answer} is not one of the record's boxes") from None
    options = "\n".join(f"{chr(65 + i)}. The object {r.phrase}" for i, r in enumerate(regions))
    return [
        {"from": "human", "value": f"<image>\n{question}\n{options}\n{MULTIPLE_CHOICE_TAIL}"},
        {"from": "gpt", "value": chr(65 + label)},
    ]


def _point_qa(record) -> list[dict[str, str]]:
    """The original's pointQA_twice question about the object in the (red) rectangle."""
    question = record.get("general_question", record.get("question"))
    answer = record.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str):
        raise RegionError("a pointQA_twice record needs 'general_question' (or 'question') and 'answer' text")
    return [
        {"from": "human", "value": f"<image>\n{question} The exemplary object is within the rectangle."
                                   "\nAnswer the question using a single word or phrase."},
        {"from": "gpt", "value": answer},
    ]


def _refcocog(record, regions, rng) -> list[dict[str, str]]:
    """The original's refcocog question without conversations: a quarter of the time one of two
    generic ones, else one naming the marker (the original's drops the phrase there, leaving
    "Describe the object ."; this names it), then "Please provide a short phrase."."""
    answer = record.get("answer")
    if not isinstance(answer, str) or not regions:
        raise RegionError("a refcocog record without conversations needs a box and an 'answer'")
    if rng.random() < 0.25:
        prompt = ("Describe the object with the visual prompt.", "Describe the pointed region.")[int(rng.integers(2))]
    else:
        prompt = f"Describe the object {regions[0].phrase}."
    return [{"from": "human", "value": f"<image>\n{prompt} Please provide a short phrase."},
            {"from": "gpt", "value": answer}]


def _vg_rel(record, regions) -> list[dict[str, str]]:
    """The original's vg_rel question without conversations: the subject / object triplet."""
    answer = record.get("answer")
    if not isinstance(answer, str) or len(regions) < 2:
        raise RegionError("a vg_rel record without conversations needs 2 boxes and an 'answer'")
    question = (
        f"Please describe the relationship between the subject {regions[0].phrase} and the object "
        f"{regions[1].phrase}. Provide a short triplet (subject, relationship, object) to represent "
        "this. Here, the subject and object are noun phrases, and the relationship can be verbs or "
        "prepositions."
    )
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


# The original's flickr30k questions (`questions` in visual_prompt_organizer.py): "semantic"
# answers name the objects only, "semantic_visual_prompt" answers name the markers too.
FLICKR_QUESTIONS = {
    "semantic": (
        "Please describe the image with the object referred to by the visual prompts; please do "
        "not mention the actual visual prompt.",
        "Describe the provided image using the semantic object referred to by the visual prompts. "
        "Please produce a sentence in natural language, and do not mention the actual visual prompts.",
    ),
    "semantic_visual_prompt": (
        "Please describe the image with the object referred to by the visual prompts; make sure to "
        "mention both the actual visual prompt and the semantic category.",
        "Please describe the image with the object referred to by the visual prompts; make sure to "
        "mention both the actual visual prompt, such as a red box, and the semantic category, such "
        "as a dog.",
    ),
}
FLICKR_HINTS = (" Hint: the visual prompts are:", " The visual prompts are:")


def _flickr30k(record, rule, rng, w, h) -> tuple[list[Region], list[dict[str, str]]]:
    """The original's flickr30k question: describe the image; the `grounding` caption, its
    ` <bboxN>` entities named by their markers (or dropped), is the answer. Every box of an
    entity gets the entity's marker."""
    entities, caption = record.get("bbox"), record.get("grounding")
    if not isinstance(entities, list) or not entities or not isinstance(caption, str):
        raise RegionError("a flickr30k record needs 'bbox' (a list of boxes per entity) and a 'grounding' caption")
    boxes = [parse_boxes(e if isinstance(e, list) and e and isinstance(e[0], list) else [e], w, h) for e in entities]
    heads = sample_regions([b[0] for b in boxes], [None] * len(boxes), rule, rng)
    mode = ("semantic", "semantic_visual_prompt")[int(rng.integers(2))]
    question = FLICKR_QUESTIONS[mode][int(rng.integers(2))]
    if rng.random() < 0.5:
        question += FLICKR_HINTS[int(rng.integers(2))]
        for i, r in enumerate(heads):
            question += (f" {r.color_name}" if r.color_name else "") + f" {SHAPE_WORDS[r.marker][1]}"
            question += "," if i < len(heads) - 1 else ""
            question += " and" if i == len(heads) - 2 else ""
        question += "."

    def entity(match: re.Match) -> str:
        n = int(match.group(1))
        if n >= len(heads):
            raise RegionError(f"<bbox{n}> names entity {n}, the record has {len(heads)}")
        return "" if mode == "semantic" else f" {heads[n].phrase}"

    answer = _sentence(re.sub(r" ?<bbox(\d+)>", entity, caption))
    regions = [dataclasses.replace(r, box=box) for r, group in zip(heads, boxes) for box in group]
    return regions, [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def _sentence(text: str) -> str:
    """The original's caption clean-up: capitalized, ", " after commas, a final period."""
    text = re.sub(r"\s*,\s*", ", ", text.strip())
    if not text:
        raise RegionError("the flickr30k caption is empty")
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."

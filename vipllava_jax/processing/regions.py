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
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.marker_spec import (
    COLORS,
    MARKERS,
    VisualPrompt,
    VisualPromptError,
    parse_polygons,
)
from vipllava_jax.processing.visual_prompts import draw_visual_prompts

# The original's `words_shape`: the words before and after "the {colour}".
SHAPE_WORDS: dict[str, tuple[str, str]] = {
    "rectangle": ("within", "rectangle"),
    "ellipse": ("within", "ellipse"),
    "triangle": ("with", "triangle"),
    "point": ("at", "point"),
    "scribble": ("with", "scribble"),
    "mask_contour": ("with", "mask contour"),
    "mask": ("with", "mask"),
    "arrow": ("pointed to by", "arrow"),
}
PLACEHOLDER = re.compile(r"<bbox(\d*)>")
MULTIPLE_CHOICE_TAIL = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class DatasetRule:
    """How one dataset's regions are drawn: the shapes sampled from and the marker style."""

    shapes: tuple[str, ...]
    style: str = "random"
    keep_polygons: bool = True


DATASETS: dict[str, DatasetRule] = {
    "refcocog": DatasetRule(MARKERS),
    "vcr": DatasetRule(tuple(m for m in MARKERS if m != "point")),
    "vg_rel": DatasetRule(("rectangle", "ellipse"), keep_polygons=False),
    "flickr30k": DatasetRule(("rectangle", "ellipse", "arrow"), keep_polygons=False),
    "v7w": DatasetRule(("rectangle",), "constant", keep_polygons=False),
    "pointQA_twice": DatasetRule(("rectangle",), "constant", keep_polygons=False),
}
DEFAULT_DATASET = "refcocog"


class RegionError(VipLlavaError):
    """A region record that cannot be drawn: a box outside the image, a malformed polygon, a
    placeholder without its region, or the fields a dataset's question needs missing."""


@dataclasses.dataclass(frozen=True)
class Region:
    """One drawn region: where, how, and the phrase that names it."""

    box: tuple[float, float, float, float]
    polygons: tuple[tuple[float, ...], ...] | None
    marker: str
    color: str | tuple[int, int, int]
    color_name: str | None

    @property
    def phrase(self) -> str:
        """E.g. "within the red rectangle"; "within the rectangle" for a random RGB colour."""
        before, after = SHAPE_WORDS[self.marker]
        colour = f" {self.color_name}" if self.color_name else ""
        return f"{before} the{colour} {after}"


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
        regions, conversations = _vcr(record, rule, rng, w, h, image_folder)
        return _draw(image, regions, rule, rng), conversations
    if dataset == "flickr30k" and not record.get("conversations") and "grounding" in record:
        regions, conversations = _flickr30k(record, rule, rng, w, h)
        return _draw(image, regions, rule, rng), conversations
    boxes = _boxes(record.get("bboxes"), w, h)
    polygons = _polygons(record.get("segmentations"), len(boxes)) if rule.keep_polygons else [None] * len(boxes)

    if dataset == "v7w" and not record.get("conversations"):
        regions = _sample(boxes, polygons, rule, rng)
        conversations = _v7w(record, boxes, regions)
    elif dataset == "pointQA_twice" and not record.get("conversations"):
        if not boxes:
            raise RegionError("a pointQA_twice record needs one box")
        regions = [Region(boxes[0], None, "rectangle", "red", "red")]
        conversations = _point_qa(record)
    else:
        regions = _sample(boxes, polygons, rule, rng)
        if dataset == "vg_rel" and not record.get("conversations"):
            conversations = _vg_rel(record, regions)
        elif dataset == "refcocog" and not record.get("conversations") and "answer" in record:
            conversations = _refcocog(record, regions, rng)
        else:
            conversations = _fill(record.get("conversations"), regions)
    return _draw(image, regions, rule, rng), conversations


def _draw(image, regions: Sequence[Region], rule: DatasetRule, rng: np.random.Generator) -> PIL.Image.Image:
    prompts = []
    for r in regions:
        try:
            prompts.append(VisualPrompt(marker=r.marker, box=r.box, polygons=r.polygons, color=r.color,
                                        style=rule.style, seed=int(rng.integers(2**31))))
        except VisualPromptError as e:
            raise RegionError(str(e)) from None
    try:
        return draw_visual_prompts(image, prompts)
    except VisualPromptError as e:
        raise RegionError(str(e)) from None


def _boxes(raw: Any, w: int, h: int) -> list[tuple[float, float, float, float]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RegionError(f"'bboxes' must be a list of [x0, y0, x1, y1] boxes, got {raw!r}")
    boxes = []
    for box in raw:
        if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise RegionError(f"a box must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 < x1 and y0 < y1):
            raise RegionError(f"box {list(box)} is empty: it needs x0 < x1 and y0 < y1")
        if x0 < -1 or y0 < -1 or x1 > w + 1 or y1 > h + 1:
            raise RegionError(f"box {list(box)} is outside the {w}x{h} image")
        # up to one pixel over the edge is rounding: clip it
        boxes.append((max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h))))
    return boxes


def _polygons(raw: Any, n: int) -> list[tuple[tuple[float, ...], ...] | None]:
    if raw is None:
        return [None] * n
    if not isinstance(raw, list) or len(raw) != n:
        raise RegionError(f"'segmentations' must list one entry (polygons or null) per box ({n}), got {raw!r}")
    try:
        return [None if p is None else parse_polygons(p) for p in raw]
    except VisualPromptError as e:
        raise RegionError(str(e)) from None


def _sample(boxes, polygons, rule: DatasetRule, rng: np.random.Generator) -> list[Region]:
    """A shape per region from the rule, then a colour: named or (half the time) random RGB,
    distinct named colours for regions that share a shape."""
    shapes = [rule.shapes[int(rng.integers(len(rule.shapes)))] for _ in boxes]
    names = list(COLORS)
    used: dict[str, set[str]] = {}
    regions = []
    for box, polygon, shape in zip(boxes, polygons, shapes):
        taken = used.setdefault(shape, set())
        if shapes.count(shape) > 1:
            free = [c for c in names if c not in taken]
            name = free[int(rng.integers(len(free)))] if free else None
        else:
            name = names[int(rng.integers(len(names)))] if rng.random() < 0.5 else None
        if name is None:
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
        else:
            color = name
            taken.add(name)
        regions.append(Region(box, polygon, shape, color, name))
    return regions


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
    boxes = [_boxes(e if isinstance(e, list) and e and isinstance(e[0], list) else [e], w, h) for e in entities]
    heads = _sample([b[0] for b in boxes], [None] * len(boxes), rule, rng)
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


# The original's VCR question text (`question_prefixes`, `options_prefixes`, `WHY_QUESTIONS`,
# `get_answer`'s templates in visual_prompt_organizer.py).
VCR_QUESTION_PREFIXES = (
    "Based on the provided source image, please answer this question: ",
    "In the context of the source image, can you answer: ",
    "With reference to the source image, please respond to the following query: ",
    "Considering the source image, what's your answer to: ",
    "Please provide an answer for the subsequent question, keeping the source image in mind: ",
    "Taking into account the source image, please answer: ",
    "After observing the source image, could you please answer the following: ",
    "Upon examining the source image, what would your answer be to: ",
    "Using the source image as a reference, please respond to: ",
    "In light of the source image, could you please answer: ",
)
VCR_OPTION_PREFIXES = (
    "Available choices are as follows: ",
    "Select from the options below: ",
    "You may choose from the following: ",
    "Your choices include: ",
    "Here are your options: ",
    "Please pick one from the given possibilities: ",
    "The following options are available: ",
    "You have the following selections: ",
    "Which among these would you choose: ",
    "You can select from these alternatives: ",
)
VCR_WHY_QUESTIONS = (
    "why?", "why", "What's the rationale for your decision?", "What led you to that conclusion?",
    "What's the reasoning behind your opinion?", "Why do you believe that to be true?",
    "Can you explain the basis for your thinking?", "What factors influenced your perspective?",
    "How did you arrive at that perspective?", "What evidence supports your viewpoint?",
    "What makes you think that way?", "What's the logic behind your argument?",
    "Can you provide some context for your opinion?", "What's the basis for your assertion?",
    "Why do you hold that belief?", "What experiences have shaped your perspective?",
    "What assumptions underlie your reasoning?", "What's the foundation of your assertion?",
    "What's the source of your reasoning?", "What's the motivation behind your decision?",
    "What's the impetus for your belief?", "What's the driving force behind your conclusion?",
    "Why do you think that?", "What's your reasoning?", "What makes you say that?",
    "Why do you feel that way?", "What's the story behind that?", "What's your thought process?",
    "What's the deal with that?", "What's the logic behind it?", "Why do you believe that?",
    "What's the real deal here?", "What's the reason behind it?",
    "What's the thought process behind your decision?", "What's the rationale for your opinion?",
    "Why do you have that impression?", "What's the background to that?",
    "What's the evidence that supports your view?", "What's the explanation for that?",
)
VCR_ADJECTIVES = ("The correct", "The most accurate", "The best", "The ultimate", "The final", "The only",
                  "The ideal", "The optimal", "The most fitting", "The definitive")
VCR_PUNCTUATION = (":", "->", "\u2192", "::", "-", ";", "|", "\u21d2")
VCR_PUNCTUATION_FREE = ".,?!:;"  # tokens written without a space before them


def _vcr_answer(letter: str, content: str, rng: np.random.Generator) -> str:
    """A multiple-choice answer in one of the original's seven styles: the letter alone, or
    with the (lower-cased) choice text."""
    content = content[:1].lower() + content[1:]
    adjective = VCR_ADJECTIVES[int(rng.integers(len(VCR_ADJECTIVES)))]
    mark = VCR_PUNCTUATION[int(rng.integers(len(VCR_PUNCTUATION)))]
    styles = (
        f"({letter})",
        f"{adjective} answer is ({letter})",
        f"({letter}){mark} {content}",
        f"{adjective} answer is ({letter}) - {content}",
        f"({letter}) - {adjective} because {content}",
        f"Answer ({letter}): {content}",
        f"Opt for ({letter}) if {content}",
    )
    return styles[int(rng.integers(len(styles)))]


def _meta_path(meta_dir: str, image_folder: str | Path | None) -> Path:
    """The original replaces './dataset' with the image folder; other relative paths are
    taken relative to it."""
    if image_folder is None:
        return Path(meta_dir)
    if meta_dir == "./dataset" or meta_dir.startswith("./dataset/"):
        return Path(image_folder) / meta_dir[len("./dataset/"):]
    path = Path(meta_dir)
    return path if path.is_absolute() else Path(image_folder) / path


def _vcr_meta(record, image_folder) -> tuple[list, list]:
    path = _meta_path(str(record["meta_dir"]), image_folder)
    try:
        meta = json.loads(path.read_text())
        boxes, segms = meta["boxes"], meta["segms"]
    except FileNotFoundError:
        raise RegionError(f"the VCR meta file {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RegionError(f"the VCR meta file {path} is not a JSON with 'boxes' and 'segms': {e}") from None
    if not isinstance(boxes, list) or not isinstance(segms, list):
        raise RegionError(f"the VCR meta file {path} needs 'boxes' and 'segms' lists")
    return boxes, segms


def _vcr_tokens(tokens: Any, what: str) -> list:
    """A token list: words (str) and object references (lists of int indices)."""
    if not isinstance(tokens, list) or not all(
        isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(i, int) and not isinstance(i, bool)
                                                                 for i in t))
        for t in tokens
    ):
        raise RegionError(f"VCR {what} must be a list of words and lists of object indices, got {tokens!r}")
    return tokens


def _vcr_text(tokens: list, phrases: dict[int, str], class_names: Any, rng: np.random.Generator,
              direct: bool = False) -> str:
    """Tokens joined with spaces (none before punctuation); a reference [i, j] becomes "the
    {name} {phrase} and the {name} {phrase}", "The" when it starts the text. The name is the
    class name or, half the time (not in the direct style), "object" / "instance"."""
    text = ""
    for k, token in enumerate(tokens):
        if isinstance(token, str):
            text += token
        else:
            for n, index in enumerate(token):
                text += "The " if k == 0 and n == 0 else " the "
                if not class_names:
                    text += "object"
                elif not direct and rng.random() < 0.5:
                    text += ("object", "instance")[int(rng.integers(2))]
                else:
                    text += str(class_names[index])
                text += " " + phrases[index]
                text += " and" if n < len(token) - 1 else ""
        if k < len(tokens) - 1 and isinstance(tokens[k + 1], str) and tokens[k + 1] not in VCR_PUNCTUATION_FREE:
            text += " "
    return text


def _vcr(record, rule, rng, w, h, image_folder) -> tuple[list[Region], list[dict[str, str]]]:
    """The original's VCR training conversation: the question (multiple choice or not), its
    answer; "why?" (multiple choice or not), the rationale. The objects the used texts
    refer to are drawn."""
    question = _vcr_tokens(record.get("question"), "'question'")
    answers = [_vcr_tokens(c, "'answer_choices'") for c in record.get("answer_choices") or []]
    rationales = [_vcr_tokens(c, "'rationale_choices'") for c in record.get("rationale_choices") or []]
    labels = record.get("answer_label"), record.get("rationale_label")
    for label, choices, name in ((labels[0], answers, "answer"), (labels[1], rationales, "rationale")):
        if not choices or len(choices) > 26:
            raise RegionError(f"a VCR record needs 1 to 26 '{name}_choices', got {len(choices)}")
        if not (isinstance(label, int) and 0 <= label < len(choices)):
            raise RegionError(f"VCR '{name}_label' {label!r} is not an index into its {len(choices)} choices")
    class_names = record.get("class_names")
    # the original's 50/50 choice, per turn: all choices and a letter, or the labelled one
    choice_answers, choice_rationales = rng.random() < 0.5, rng.random() < 0.5
    answers = answers if choice_answers else [answers[labels[0]]]
    rationales = rationales if choice_rationales else [rationales[labels[1]]]

    used = sorted({i for tokens in [question, *answers, *rationales] for t in tokens if isinstance(t, list)
                   for i in t})
    meta_boxes, meta_segms = _vcr_meta(record, image_folder)
    n = min(len(meta_boxes), len(meta_segms), len(class_names) if isinstance(class_names, list) else math.inf)
    bad = [i for i in used if not 0 <= i < n]
    if bad:
        raise RegionError(f"VCR object {bad[0]} is not in the meta file / class_names ({n} objects)")
    boxes = _boxes([b[:4] if isinstance(b, list) else b for b in (meta_boxes[i] for i in used)], w, h)
    polygons = []
    for i in used:
        # the original keeps polygons of 4 points or more, last first, as flat [x, y, ...]
        try:
            kept = [[v for point in p for v in point] for p in reversed(meta_segms[i] or []) if len(p) >= 4]
        except TypeError:
            raise RegionError(f"VCR object {i}'s segms are not lists of [x, y] points") from None
        polygons.append(kept or None)
    polygons = _polygons(polygons, len(boxes))
    regions = _sample(boxes, polygons, rule, rng)
    phrases = {i: r.phrase for i, r in zip(used, regions)}

    def turn(first: str, choices: list, multiple: bool, label: int) -> tuple[str, str]:
        texts = [_vcr_text(c, phrases, class_names, rng) for c in choices]
        if multiple:
            first += " " + VCR_OPTION_PREFIXES[int(rng.integers(len(VCR_OPTION_PREFIXES)))]
            first += " ".join(f"({chr(65 + k)}) {t}" for k, t in enumerate(texts))
            return first, _vcr_answer(chr(65 + label), texts[label], rng)
        return first, texts[0]

    prefix = VCR_QUESTION_PREFIXES[int(rng.integers(len(VCR_QUESTION_PREFIXES)))]
    ask, answer = turn("<image>\n" + prefix + _vcr_text(question, phrases, class_names, rng),
                       answers, choice_answers, labels[0])
    why, rationale = turn(VCR_WHY_QUESTIONS[int(rng.integers(len(VCR_WHY_QUESTIONS)))],
                          rationales, choice_rationales, labels[1])
    return regions, [{"from": "human", "value": ask}, {"from": "gpt", "value": answer},
                     {"from": "human", "value": why}, {"from": "gpt", "value": rationale}]

"""VCR records of ViP-LLaVA-Instruct: their objects read from the record's meta file, drawn,
and named in a two-turn question (answer, then rationale), multiple-choice or direct."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from vipllava_jax import storage
from vipllava_jax.processing.region_core import (
    Region,
    RegionError,
    parse_boxes,
    parse_segmentations,
    sample_regions,
)

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


def _meta_path(meta_dir: str, image_folder: str | os.PathLike | None):
    """The original replaces './dataset' with the image folder; other relative paths are
    taken relative to it. Either may be a `gs://` URL (`storage.path`: kept whole, never
    through `pathlib.Path`); an absolute path or a URL in `meta_dir` is used as given."""
    if image_folder is None or storage.is_remote(meta_dir):
        return storage.path(meta_dir)
    if meta_dir == "./dataset" or meta_dir.startswith("./dataset/"):
        return storage.path(image_folder) / meta_dir[len("./dataset/"):]
    path = Path(meta_dir)
    return path if path.is_absolute() else storage.path(image_folder) / path.as_posix()


def _vcr_meta(record, image_folder) -> tuple[list, list]:
    path = _meta_path(str(record["meta_dir"]), image_folder)
    try:
        meta = json.loads(storage.read_text(path))
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


def vcr_regions(record, rule, rng, w, h, image_folder) -> tuple[list[Region], list[dict[str, str]]]:
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
    boxes = parse_boxes([b[:4] if isinstance(b, list) else b for b in (meta_boxes[i] for i in used)], w, h)
    polygons = []
    for i in used:
        # the original keeps polygons of 4 points or more, last first, as flat [x, y, ...]
        try:
            kept = [[v for point in p for v in point] for p in reversed(meta_segms[i] or []) if len(p) >= 4]
        except TypeError:
            raise RegionError(f"VCR object {i}'s segms are not lists of [x, y] points") from None
        polygons.append(kept or None)
    polygons = parse_segmentations(polygons, len(boxes))
    regions = sample_regions(boxes, polygons, rule, rng)
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

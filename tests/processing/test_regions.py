"""ViP-LLaVA-Instruct region records drawn as the original's data processing does: each
dataset's shapes, markers on their regions in the colour their phrase names, `<bbox>` filled,
v7w / pointQA questions built, bad regions refused in one line."""

from __future__ import annotations

import re

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest

from vipllava_jax.processing.regions import RegionError, mark_record

W, H = 400, 300
S = max(W, H) / 336
GREY = 128
BOX = [120, 80, 260, 200]
DIAMOND = [190, 80, 260, 140, 190, 200, 120, 140]  # a COCO polygon inside BOX

# The original's facts (its data processing, llava/visual_prompt_organizer.py): shapes per dataset, the phrase of
# each shape, the nine colour names and values.
SHAPES = {
    "refcocog": {"rectangle", "ellipse", "triangle", "point", "scribble", "mask contour", "mask", "arrow"},
    "vcr": {"rectangle", "ellipse", "triangle", "scribble", "mask contour", "mask", "arrow"},
    "vg_rel": {"rectangle", "ellipse"},
    "flickr30k": {"rectangle", "ellipse", "arrow"},
    "v7w": {"rectangle"},
    "pointQA_twice": {"rectangle"},
    "mydata": {"rectangle", "ellipse", "triangle", "point", "scribble", "mask contour", "mask", "arrow"},
}
WORDS = {"rectangle": "within", "ellipse": "within", "triangle": "with", "point": "at",
         "scribble": "with", "mask contour": "with", "mask": "with", "arrow": "pointed to by"}
COLOURS = {"red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "fuchsia": (255, 0, 255), "aqua": (0, 255, 255), "orange": (255, 165, 0),
           "purple": (128, 0, 128), "gold": (255, 215, 0)}
PHRASE = re.compile(
    r"(within|with|at|pointed to by) the (?:(" + "|".join(COLOURS) + r") )?"
    r"(rectangle|ellipse|triangle|point|scribble|mask contour|mask|arrow)"
)


def grey():
    return PIL.Image.fromarray(np.full((H, W, 3), GREY, np.uint8))


def changed(after):
    return (np.asarray(after).astype(int) != GREY).any(-1)


def record_for(dataset, n=1):
    rid = f"{dataset}-gpt4v-7"
    if dataset == "v7w":
        boxes = [[20, 20, 80, 80], [300, 20, 380, 90], BOX, [20, 220, 90, 290]]
        return {"id": rid, "image": "x.png", "question": "Which is the cat?", "bboxes": boxes, "answer": BOX}
    if dataset == "pointQA_twice":
        return {"id": rid, "image": "x.png", "bboxes": [BOX], "general_question": "What is this?",
                "answer": "cat"}
    record = {"id": rid, "image": "x.png", "bboxes": [BOX],
              "conversations": [{"from": "human", "value": "What is the object <bbox>?"},
                                {"from": "gpt", "value": "A cat, the object <bbox0>."}]}
    if dataset not in ("vg_rel", "flickr30k"):
        record["segmentations"] = [[DIAMOND]]
    return record


def parse(text):
    """The phrases in `text` as (words, colour name or None, shape)."""
    return PHRASE.findall(text)


def colour_direction(mask, image):
    """The unit direction of the marker pixels' mean offset from the grey background."""
    offset = (np.asarray(image).astype(float)[mask] - GREY).mean(0)
    return offset / np.linalg.norm(offset)


@pytest.mark.parametrize("dataset", list(SHAPES))
def test_each_dataset_draws_its_shapes_on_the_region_with_the_phrase_naming_them(dataset):
    seen = set()
    x0, y0, x1, y1 = BOX
    for seed in range(12):
        image, conv = mark_record(record_for(dataset), grey(), np.random.default_rng(seed))
        text = " ".join(m["value"] for m in conv)
        assert "<bbox" not in text
        phrases = parse(conv[0]["value"])
        assert phrases, conv[0]["value"]
        words, colour, shape = phrases[0]
        assert shape in SHAPES[dataset] and words == WORDS[shape]
        seen.add(shape)
        d = changed(image)
        if dataset == "v7w":
            # four options naming four distinct coloured rectangles; the answer is the letter of BOX
            assert len({p[1] for p in phrases}) == 4 and all(p[1] for p in phrases)
            assert conv[1]["value"] == "C"
            assert conv[0]["value"].startswith("<image>\nWhich is the cat?\nA. The object within the ")
            assert conv[0]["value"].endswith("\nAnswer with the option's letter from the given choices directly.")
            colour = phrases[2][1]  # option C's box is BOX: look at its pixels only
            d = np.zeros_like(d)
            d[y0 - 3 : y1 + 3, x0 - 3 : x1 + 3] = changed(image)[y0 - 3 : y1 + 3, x0 - 3 : x1 + 3]
        if dataset == "pointQA_twice":
            assert conv[0]["value"] == ("<image>\nWhat is this? The exemplary object is within the rectangle."
                                        "\nAnswer the question using a single word or phrase.")
            assert conv[1]["value"] == "cat"
            colour = "red"
        elif dataset != "v7w":  # <bbox> and <bbox0> are the same region
            assert parse(conv[1]["value"]) == [phrases[0]]
        ys, xs = np.nonzero(d)
        # On the region: outlines within their width (ellipses up to 1.5 x), the arrow's tip
        # in the box.
        reach = {"ellipse": 0.25 * (x1 - x0) + 8 * S, "arrow": None, "point": 40 * S}.get(shape, 12 * S / 2 + 2)
        if reach is None:
            assert (d[y0:y1, x0:x1]).any()
        else:
            assert xs.min() >= x0 - reach and xs.max() <= x1 + reach
            assert ys.min() >= y0 - reach and ys.max() <= y1 + reach
        if shape == "rectangle":  # the box's outline: its corners drawn, its middle not
            assert d[y0, x0] and d[y1 - 1, x1 - 1] and not d[(y0 + y1) // 2, (x0 + x1) // 2]
        if shape == "mask":  # the polygon filled
            polygon = PIL.Image.new("1", (W, H))
            PIL.ImageDraw.Draw(polygon).polygon(DIAMOND, fill=1, outline=1)
            np.testing.assert_array_equal(d, np.asarray(polygon, bool))
        if colour:
            want = np.asarray(COLOURS[colour], float) - GREY
            assert colour_direction(d, image) @ (want / np.linalg.norm(want)) > 0.97, (seed, colour)
    if dataset in ("vg_rel", "flickr30k", "v7w", "pointQA_twice"):
        assert seen == SHAPES[dataset]


def test_regions_sharing_a_shape_get_distinct_colour_names():
    record = {"id": "vg_rel-gpt4v-1", "image": "x.png", "bboxes": [[10, 10, 100, 100], [200, 100, 390, 290]],
              "conversations": [{"from": "human", "value": "How is <bbox0> related to <bbox1>?"},
                                {"from": "gpt", "value": "The cup <bbox0> is on the table <bbox1>."}]}
    for seed in range(20):
        _, conv = mark_record(record, grey(), np.random.default_rng(seed))
        (a, b) = parse(conv[0]["value"])
        if a[2] == b[2]:
            assert a[1] and b[1] and a[1] != b[1]
        assert parse(conv[1]["value"]) == [a, b]


def test_vg_rel_without_conversations_asks_for_the_triplet():
    record = {"id": "vg_rel-1", "image": "x.png", "bboxes": [[10, 10, 100, 100], [200, 100, 390, 290]],
              "answer": "(cup, on, table)"}
    _, conv = mark_record(record, grey(), np.random.default_rng(0))
    q = conv[0]["value"]
    assert q.startswith("<image>\nPlease describe the relationship between the subject within the ")
    assert "Provide a short triplet (subject, relationship, object)" in q
    assert conv[1]["value"] == "(cup, on, table)"


def test_the_same_rng_draws_the_same():
    record = record_for("refcocog")
    a = mark_record(record, grey(), np.random.default_rng([3, 1, 5]))
    b = mark_record(record, grey(), np.random.default_rng([3, 1, 5]))
    assert a[1] == b[1]
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    draws = {np.asarray(mark_record(record, grey(), np.random.default_rng([3, e, 5]))[0]).tobytes()
             for e in range(4)}
    assert len(draws) > 1


@pytest.mark.parametrize("change, match", [
    ({"bboxes": [[300, 200, 450, 290]]}, "outside the 400x300 image"),
    ({"bboxes": [[10, 10, 5, 50]]}, "empty"),
    ({"bboxes": [[10, 10, 50]]}, "4 numbers"),
    ({"segmentations": [[[10, 10, 50, 10, 50]]]}, "flat"),
    ({"segmentations": [[[10, 10, 50, 10]]]}, "3 points"),
    ({"segmentations": [[[10, 10, 500, 10, 30, 40]]]}, "outside the 400x300 image"),
    ({"segmentations": []}, "one entry"),
    ({"conversations": [{"from": "human", "value": "Is <bbox1> red?"}, {"from": "gpt", "value": "no"}]},
     "names region 1"),
    ({"bboxes": None}, "names region 0"),
])
def test_bad_regions_are_one_line_errors(change, match):
    record = {**record_for("refcocog"), **change}
    if change.get("bboxes", 1) is None:
        del record["segmentations"]
    with pytest.raises(RegionError, match=match) as e:
        mark_record(record, grey(), np.random.default_rng(0))
    assert "\n" not in str(e.value)


def test_v7w_answer_must_be_one_of_its_boxes():
    record = {**record_for("v7w"), "answer": [1, 2, 3, 4]}
    with pytest.raises(RegionError, match="not one of the record's boxes"):
        mark_record(record, grey(), np.random.default_rng(0))


def test_flickr30k_grounding_records_describe_the_image():
    record = {"id": "flickr30k-12", "image": "x.png",
              "bbox": [[[10, 10, 60, 60], [300, 10, 380, 60]], [[100, 120, 250, 280]]],
              "grounding": "a man <bbox0> holds a dog <bbox1> , near a tree"}
    modes = set()
    for seed in range(16):
        image, conv = mark_record(record, grey(), np.random.default_rng(seed))
        question, answer = conv[0]["value"], conv[1]["value"]
        assert question.startswith("<image>\nPlease describe the image") or question.startswith(
            "<image>\nDescribe the provided image")
        assert "<bbox" not in answer and answer.endswith("near a tree.") and answer.startswith("A man")
        phrases = parse(answer)
        if phrases:  # the markers named: entity 0's phrase after "man", entity 1's after "dog"
            modes.add("named")
            assert answer.startswith(f"A man {phrases[0][0]} the") and len(phrases) == 2
            assert all(p[2] in {"rectangle", "ellipse", "arrow"} for p in phrases)
        else:
            modes.add("plain")
            assert answer == "A man holds a dog, near a tree."
        d = changed(image)
        # both boxes of entity 0 carry a marker, and entity 1's box
        for x0, y0, x1, y1 in ([10, 10, 60, 60], [300, 10, 380, 60], [100, 120, 250, 280]):
            assert d[y0:y1, x0:x1].any() or d[max(y0 - 60, 0):y1 + 60, max(x0 - 60, 0):x1 + 60].any()
    assert modes == {"named", "plain"}


def test_refcocog_without_conversations_asks_for_a_short_phrase():
    record = {"id": "refcocog-5", "image": "x.png", "bboxes": [BOX], "answer": "the black cat"}
    questions = set()
    for seed in range(16):
        _, conv = mark_record(record, grey(), np.random.default_rng(seed))
        q = conv[0]["value"]
        assert q.startswith("<image>\nDescribe the") and q.endswith(" Please provide a short phrase.")
        assert conv[1]["value"] == "the black cat"
        questions.add("named" if parse(q) else q)
    assert questions == {"named", "<image>\nDescribe the object with the visual prompt. Please provide a short phrase.",
                         "<image>\nDescribe the pointed region. Please provide a short phrase."}

"""VCR region records drawn as the original's data processing does: the meta file's referenced
objects marked with VCR's shapes, references in the question / choices replaced by the markers'
phrases, the two-turn conversation multiple choice (the letter of the label) or direct, and a
missing meta file or a bad reference refused in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import PIL.Image
import pytest

from vipllava_jax.processing.regions import RegionError, has_regions, mark_record

W, H = 400, 300
S = max(W, H) / 336
GREY = 128
# meta boxes [x0, y0, x1, y1, score]; object 1 is never referenced, so never drawn
BOXES = [[20, 30, 150, 160, 0.9], [250, 200, 390, 290, 0.8], [200, 20, 360, 150, 0.95]]
SEGMS = [
    [[[85, 30], [150, 95], [85, 160], [20, 95]]],
    [[[300, 210], [380, 280], [260, 280], [300, 240]]],
    [[[280, 20], [360, 85], [280, 150], [200, 85]], [[1, 1], [2, 2]]],  # the 2-point one is dropped
]
SHAPES = {"rectangle", "ellipse", "triangle", "scribble", "mask contour", "mask", "arrow"}
WORDS = {"rectangle": "within", "ellipse": "within", "triangle": "with", "scribble": "with",
         "mask contour": "with", "mask": "with", "arrow": "pointed to by"}
COLOURS = {"red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
           "fuchsia": (255, 0, 255), "aqua": (0, 255, 255), "orange": (255, 165, 0),
           "purple": (128, 0, 128), "gold": (255, 215, 0)}
PHRASE = re.compile(
    r"the (person|dog|object|instance) (within|with|at|pointed to by) the (?:(" + "|".join(COLOURS) + r") )?"
    r"(rectangle|ellipse|triangle|point|scribble|mask contour|mask|arrow)", re.I)


def record(**change):
    r = {
        "id": "vcr-train-3", "image": "vcr1images/movie/3.jpg", "meta_dir": "./dataset/vcr1images/movie/3.json",
        "question": ["What", "is", [0], "doing", "with", [2], "?"],
        "answer_choices": [[[0], "is", "feeding", [2], "."], ["Nothing", "."], [[0, 2], "are", "sleeping", "."],
                           ["He", "is", "running", "."]],
        "answer_label": 0,
        "rationale_choices": [["The", "bowl", "is", "near", [2], "."], ["It", "is", "night", "."],
                              [[2], "wags", "its", "tail", ",", "so", "it", "is", "happy", "."],
                              ["No", "reason", "."]],
        "rationale_label": 2,
        "class_names": ["person", "person", "dog"],
    }
    return {**r, **change}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "vcr1images" / "movie").mkdir(parents=True)
    (tmp_path / "vcr1images" / "movie" / "3.json").write_text(json.dumps({"boxes": BOXES, "segms": SEGMS}))
    return tmp_path


def grey():
    return PIL.Image.fromarray(np.full((H, W, 3), GREY, np.uint8))


def text_of(conv):
    return " ".join(m["value"] for m in conv)


def test_vcr_records_are_region_records():
    assert has_regions(record())


def test_referenced_objects_are_drawn_and_named(folder):
    letters = directs = 0
    seen = set()
    for seed in range(16):
        image, conv = mark_record(record(), grey(), np.random.default_rng(seed), image_folder=folder)
        assert [m["from"] for m in conv] == ["human", "gpt", "human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n") and "What is the " in conv[0]["value"]
        text = text_of(conv)
        # no raw index lists or reprs left
        assert "[" not in text and "]" not in text and "'" not in text.replace("'s", ""), text
        assert " ?" not in text and " ." not in text and " ," not in text, text
        phrases = PHRASE.findall(text)
        assert phrases, text
        for _name, words, _colour, shape in phrases:
            assert shape in SHAPES and words == WORDS[shape]
        # the question names objects 0 and 2: two regions; each object has one phrase everywhere
        q = {p[1:] for p in PHRASE.findall(conv[0]["value"])}
        assert len(q) == 2, conv[0]["value"]
        assert {p[1:] for p in phrases} == q
        seen |= {p[3] for p in phrases}

        d = (np.asarray(image).astype(int) != GREY).any(-1)
        assert d.any()
        # marker pixels only on / around the referenced boxes (0 and 2), none on object 1's
        # outlines within their width; ellipses (up to 1.5x the box) and arrow shafts reach further
        r = 40 * S if any(p[3] in ("ellipse", "arrow") for p in phrases) else 8 * S
        inside = np.zeros_like(d)
        for x0, y0, x1, y1, _ in (BOXES[0], BOXES[2]):
            inside[max(0, int(y0 - r)):int(y1 + r), max(0, int(x0 - r)):int(x1 + r)] = True
        assert not (d & ~inside).any(), seed
        for x0, y0, x1, y1, _ in (BOXES[0], BOXES[2]):
            assert d[y0:y1, x0:x1].any(), seed
        assert not d[230:290, 365:390].any()  # object 1's box corner, far from the others

        if conv[1]["value"].startswith(("(", "Answer (", "Opt for (")) or " answer is (" in conv[1]["value"]:
            letters += 1
            assert "(A)" in conv[0]["value"] and "(D)" in conv[0]["value"]
            assert re.search(r"\(([A-D])\)", conv[1]["value"]).group(1) == "A"  # answer_label 0
        else:
            directs += 1
            assert "(A)" not in conv[0]["value"]
            assert conv[1]["value"].startswith("The ") and "is feeding the " in conv[1]["value"]
        if "(A)" in conv[2]["value"]:
            assert re.search(r"\(([A-D])\)", conv[3]["value"]).group(1) == "C"  # rationale_label 2
        else:
            assert conv[3]["value"].startswith("The ") and "wags its tail, so it is happy." in conv[3]["value"]
    assert letters and directs
    assert len(seen) >= 3


def test_marker_colour_matches_the_named_colour(folder):
    # a record referring to one object: every changed pixel is that object's marker
    one = record(question=["Is", [2], "happy", "?"], answer_choices=[["Yes", "."]] * 4,
                 rationale_choices=[["It", "smiles", "."]] * 4)
    checked = 0
    for seed in range(20):
        image, conv = mark_record(one, grey(), np.random.default_rng(seed), image_folder=folder)
        (name, words, colour, shape), = set(PHRASE.findall(text_of(conv)))
        d = (np.asarray(image).astype(int) != GREY).any(-1)
        x0, y0, x1, y1, _ = BOXES[2]
        assert d[y0:y1, x0:x1].any()
        if colour:
            offset = (np.asarray(image).astype(float)[d] - GREY).mean(0)
            want = np.asarray(COLOURS[colour], float) - GREY
            assert offset @ want / np.linalg.norm(offset) / np.linalg.norm(want) > 0.97, (seed, colour)
            checked += 1
    assert checked


def test_the_same_rng_draws_the_same(folder):
    a = mark_record(record(), grey(), np.random.default_rng(3), image_folder=folder)
    b = mark_record(record(), grey(), np.random.default_rng(3), image_folder=folder)
    assert a[1] == b[1] and np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_meta_paths_resolve_against_the_image_folder(folder, monkeypatch):
    for meta in ("vcr1images/movie/3.json", str(folder / "vcr1images/movie/3.json")):
        mark_record(record(meta_dir=meta), grey(), np.random.default_rng(0), image_folder=folder)
    monkeypatch.chdir(folder)  # without a folder the path is used as given
    mark_record(record(meta_dir="vcr1images/movie/3.json"), grey(), np.random.default_rng(0))


@pytest.mark.parametrize("change, match", [
    ({"meta_dir": "./dataset/vcr1images/movie/missing.json"}, "does not exist"),
    ({"question": ["Is", [5], "ok", "?"]}, "VCR object 5 is not in"),
    ({"class_names": ["person"]}, "VCR object 2 is not in"),
    ({"answer_label": 4}, "answer_label"),
    ({"question": ["Is", ["x"], "?"]}, "'question' must be"),
])
def test_bad_vcr_records_are_one_line_errors(folder, change, match):
    with pytest.raises(RegionError, match=match) as e:
        mark_record(record(**change), grey(), np.random.default_rng(0), image_folder=folder)
    assert "\n" not in str(e.value)


def test_the_training_loader_reads_vcr_meta_files_from_its_image_folder(folder):
    """A VCR record in a training file: the loader passes its image folder, so `./dataset/...`
    meta paths resolve there and the image is marked."""
    from tests.helpers import make_word_tokenizer
    from vipllava_jax.processing.images import CLIPImagePreprocessor
    from vipllava_jax.processing.processor import VipLlavaProcessor
    from vipllava_jax.train.data import IGNORE_INDEX, LoaderOptions, TrainDataLoader

    tokenizer = make_word_tokenizer(folder / "tok", ["What is the person dog doing with feeding wags its tail"])
    processor = VipLlavaProcessor(tokenizer, CLIPImagePreprocessor.for_size(28, pad_to_square=True),
                                  num_image_tokens=4)
    grey().save(folder / "vcr1images" / "movie" / "3.jpg")
    path = folder / "data.jsonl"
    path.write_text(json.dumps(record()) + "\n")
    options = LoaderOptions(batch_size=1, max_length=256, process_index=0, process_count=1, num_workers=1,
                            shuffle=False, num_epochs=1, strict=True)
    (batch,) = list(TrainDataLoader(path, folder, processor, options, template="llava_v1"))
    plain = processor.image_processor.preprocess(grey())
    assert not np.array_equal(batch["pixel_values"][0], plain)
    assert (batch["labels"][0] != IGNORE_INDEX).any()

"""Region records (ViP-LLaVA-Instruct's format) through the training loader: markers drawn on
the image, no `<bbox` left in any token, labels on the filled answers, the same markers after a
resume, bad regions skipped and counted (or errors with strict)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import PIL.Image
import pytest

from tests.helpers import make_word_tokenizer
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.images import CLIPImagePreprocessor
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import TEMPLATES, build_prompt
from vipllava_jax.train.data import IGNORE_INDEX, LoaderOptions, TrainDataLoader

SIZE = 56
BOX = [10, 12, 40, 44]
PHRASE_WORDS = ("within the with at pointed to by rectangle ellipse triangle point scribble mask contour "
                "arrow red lime blue yellow fuchsia aqua orange purple gold it")
MC = "Which is the cat?\nA. The object\nAnswer with the option's letter from the given choices directly. A B C D"


def region_records():
    return [
        {"id": "refcocog-gpt4v-0", "image": "0.png", "bboxes": [BOX],
         "segmentations": [[[25, 12, 40, 28, 25, 44, 10, 28]]],
         "conversations": [{"from": "human", "value": "What is the object <bbox>?"},
                           {"from": "gpt", "value": "A cat <bbox>."}]},
        {"id": "vg_rel-gpt4v-1", "image": "1.png", "bboxes": [[2, 2, 20, 20], [30, 30, 54, 54]],
         "conversations": [{"from": "human", "value": "<image>\nHow is <bbox0> related to <bbox1>?"},
                           {"from": "gpt", "value": "The cup <bbox0> is on <bbox1>."}]},
        {"id": "v7w-2", "image": "2.png", "question": "Which is the cat?",
         "bboxes": [[2, 2, 20, 20], [30, 2, 54, 20], [2, 30, 20, 54], [30, 30, 54, 54]],
         "answer": [30, 2, 54, 20]},
        {"id": "3", "image": "3.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                         {"from": "gpt", "value": "A cat."}]},
    ]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    corpus = [build_prompt([("What is the object <bbox>? How is related to", "A cat The cup is on")], t)
              for t in TEMPLATES] + [PHRASE_WORDS, MC]
    tokenizer = make_word_tokenizer(tmp_path_factory.mktemp("tok"), corpus)
    return VipLlavaProcessor(tokenizer, CLIPImagePreprocessor.for_size(28, pad_to_square=True), num_image_tokens=4)


def write(folder, records):
    for r in records:
        PIL.Image.fromarray(np.full((SIZE, SIZE + 8, 3), 128, np.uint8)).save(folder / r["image"])
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def loader(processor, path, **kw):
    options = LoaderOptions(**{"batch_size": 1, "max_length": 96, "process_index": 0, "process_count": 1,
                               "num_workers": 2, "shuffle": False, "num_epochs": 1, **kw})
    return TrainDataLoader(path, path.parent, processor, options, template="llava_v1")


def tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_region_records_train_with_drawn_markers_and_filled_phrases(processor, tmp_path):
    path = write(tmp_path, region_records())
    batches = list(loader(processor, path))
    assert len(batches) == 4
    plain = processor.image_processor.preprocess(PIL.Image.open(tmp_path / "3.png").convert("RGB"))
    for n, batch in enumerate(batches):
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        words = tokens(processor, ids[batch["attention_mask"][0] == 1])
        assert "bbox" not in words and "<unk>" not in words, " ".join(words)
        answer = tokens(processor, labels[labels != IGNORE_INDEX])
        marked = not np.array_equal(batch["pixel_values"][0], plain)
        if n == 0:  # the phrase fills the answer too, and the labels cover it
            assert answer[:2] == ["A", "cat"] and ("within" in answer or "with" in answer or "at" in answer
                                                  or "pointed" in answer), answer
            assert marked
        elif n == 1:
            assert answer[:2] == ["The", "cup"] and answer.count("the") == 2 and "on" in answer, answer
            assert marked
        elif n == 2:  # v7w: the letter of the answer's box
            assert answer[0] == "B" and "Answer" in words and "A" in words and "D" in words
            assert marked
        else:  # a record without regions: the image as it is
            assert not marked and answer[:2] == ["A", "cat"]


def test_a_resumed_run_draws_the_same_markers(processor, tmp_path):
    path = write(tmp_path, region_records())
    full = list(loader(processor, path, num_epochs=2, shuffle=True, seed=5))
    first = loader(processor, path, num_epochs=2, shuffle=True, seed=5)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = loader(processor, path, num_epochs=2, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    for a, b in zip(full, head + list(resumed), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # Another epoch or seed draws other markers for the same record.
    other = list(loader(processor, path, num_epochs=2, shuffle=True, seed=6))
    pixels = lambda batches: {b["pixel_values"].tobytes() for b in batches}  # noqa: E731
    assert pixels(full) != pixels(other)
    assert len(pixels(full)) > 4  # epoch 1 is not epoch 0 again


def test_worker_processes_draw_what_threads_draw(processor, tmp_path):
    path = write(tmp_path, region_records())
    threads = list(loader(processor, path))
    procs = list(loader(processor, path, worker_type="processes"))
    for a, b in zip(threads, procs, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


BAD = [
    {"id": "refcocog-9", "image": "9.png", "bboxes": [[30, 30, 90, 50]],
     "conversations": [{"from": "human", "value": "What is <bbox>?"}, {"from": "gpt", "value": "A cat."}]},
    {"id": "refcocog-10", "image": "10.png", "bboxes": [BOX], "segmentations": [[[1, 2, 3]]],
     "conversations": [{"from": "human", "value": "What is <bbox>?"}, {"from": "gpt", "value": "A cat."}]},
    {"id": "refcocog-11", "image": "11.png",
     "conversations": [{"from": "human", "value": "What is <bbox>?"}, {"from": "gpt", "value": "A cat."}]},
]


def test_bad_regions_are_skipped_and_counted(processor, tmp_path):
    path = write(tmp_path, region_records() + BAD)
    data = loader(processor, path)
    assert len(list(data)) == 4
    assert data.stats["skipped_bad_region"] == 3 and data.stats["examples"] == 4


@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_regions_are_errors_with_strict(processor, tmp_path, bad):
    path = write(tmp_path, [BAD[bad]])
    with pytest.raises(VipLlavaError, match=r"data.jsonl line 1: ") as e:
        list(loader(processor, path, strict=True))
    assert "\n" not in str(e.value)


def test_region_records_train_and_resume_through_vipllava_train(workspace, tmp_path):
    """The original's format end to end: a run over region records gives finite losses with no
    record skipped, and a resumed run gives the uninterrupted run's losses (the same markers)."""
    from tests.helpers.train import run_config
    from vipllava_jax.train import train

    boxes = [[2, 2, 12, 12], [14, 2, 26, 12], [2, 14, 12, 26], [14, 14, 26, 26]]
    records = []
    for i in range(8):
        if i % 2:
            records.append({"id": f"v7w-{i}", "image": f"{i}.png", "question": "What is inside the red rectangle ?",
                            "bboxes": boxes, "answer": boxes[i % 4]})
        else:
            records.append({"id": f"refcocog-gpt4v-{i}", "image": f"{i}.png", "bboxes": [boxes[i % 4]],
                            "segmentations": [None],
                            "conversations": [{"from": "human", "value": "What does <bbox> point at ?"},
                                              {"from": "gpt", "value": "a cat on a chair"}]})
    root = tmp_path / "root"  # the workspace's model and images, these records
    root.mkdir()
    for name in ("model", "images"):
        (root / name).symlink_to(workspace / name)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    def config(out, **kw):
        return dataclasses.replace(run_config(root, out, steps=4, save_every=2, **kw), max_length=128)

    full = train(config(tmp_path / "a"), progress=False)
    assert all(np.isfinite(m["loss"]) for m in full)
    assert full[-1]["data_examples"] == 32 and full[-1]["data_skipped_bad_region"] == 0
    train(config(tmp_path / "b", stop_after=3), progress=False)
    rest = train(config(tmp_path / "b"), progress=False)
    assert [m["loss"] for m in rest] == [m["loss"] for m in full[2:]]

"""The training data loader over records and images in a bucket (the local GCS emulator): the
same batches as from local disk, with threads and worker processes; missing objects and reads
that fail are skipped and counted, transient failures retried."""

from __future__ import annotations

import json
import os
import types

import numpy as np
import PIL.Image
import pytest

from tests.helpers import make_word_tokenizer
from vipllava_jax import storage
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import build_prompt
from vipllava_jax.train.data import LoaderOptions, TrainDataLoader

QUESTION = "What is inside the red rectangle?"
NUM_RECORDS = 6
MISSING = 1  # record 1's image is never written


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    corpus = [build_prompt(QUESTION)] + [f"answer{i}" for i in range(NUM_RECORDS)] + ["###"]
    tokenizer = make_word_tokenizer(tmp_path_factory.mktemp("tok"), corpus)
    return VipLlavaProcessor(tokenizer, image_size=28, num_image_tokens=4)


@pytest.fixture
def dataset(tmp_path, gcs_bucket):
    """The same records and PNGs in `tmp_path` and under `<bucket>/data`: (local file, URL)."""
    rng = np.random.default_rng(0)
    remote = storage.path(gcs_bucket) / "data"
    lines = []
    for i in range(NUM_RECORDS):
        lines.append(json.dumps({"id": str(i), "image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": f"answer{i}"}]}))
        if i == MISSING:
            continue
        (tmp_path / "images").mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (int(rng.integers(20, 40)), 30, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        (remote / "images" / f"{i}.png").write_bytes((tmp_path / "images" / f"{i}.png").read_bytes())
    text = "\n".join(lines) + "\n"
    (tmp_path / "data.jsonl").write_text(text)
    (remote / "data.jsonl").write_text(text)
    return tmp_path / "data.jsonl", os.fspath(remote / "data.jsonl")


def make_loader(processor, data, image_folder=None, **kw):
    options = LoaderOptions(**{"batch_size": 2, "max_length": 48, "process_index": 0, "process_count": 1,
                               "num_workers": 2, "num_epochs": 1, "seed": 3, **kw})
    return TrainDataLoader(data, image_folder, processor, options)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("worker_type", ["threads", "processes"])
def test_a_bucket_yields_the_batches_of_local_disk(processor, dataset, worker_type):
    local, url = dataset
    expected_loader = make_loader(processor, local)
    expected = list(expected_loader)
    assert len(expected) == 2 and expected_loader.stats["skipped_bad_image"] == 1  # the missing one

    folder = url.rsplit("/", 1)[0]
    # one worker process (each spawned one imports the package: seconds)
    workers = {"worker_type": worker_type, "num_workers": 1 if worker_type == "processes" else 2}
    loader = make_loader(processor, url, **workers)  # images beside the records
    assert os.fspath(loader.image_folder) == folder
    assert_same_batches(expected, list(loader))
    assert loader.stats == expected_loader.stats
    if worker_type == "threads":
        assert_same_batches(expected, list(make_loader(processor, url, folder)))  # a given folder


def test_validate_reads_the_bucket(processor, dataset):
    local, url = dataset
    usable, problems = make_loader(processor, url, num_workers=0).validate()
    assert usable == NUM_RECORDS - 1 and len(problems) == 1
    assert problems[0].startswith(f"{url} line 2: bad_image: cannot read image gs://")
    assert make_loader(processor, local, num_workers=0).validate()[0] == usable


def test_transient_read_errors_are_retried_and_lasting_ones_skipped(processor, dataset, monkeypatch):
    """Image 2 fails twice then reads; image 3 never reads: 2 is loaded, 3 is skipped and counted
    with the missing image 1."""
    local, url = dataset
    waits = []
    monkeypatch.setattr(storage, "time", types.SimpleNamespace(sleep=waits.append))
    path_type = type(storage.path(url))
    read_bytes = path_type.read_bytes
    calls = {"2.png": 0, "3.png": 0}

    def flaky_read_bytes(self):
        if self.name in calls:
            calls[self.name] += 1
            if self.name == "3.png" or calls[self.name] <= 2:
                raise ConnectionError("connection reset by peer")
        return read_bytes(self)

    monkeypatch.setattr(path_type, "read_bytes", flaky_read_bytes)
    loader = make_loader(processor, url, batch_size=1, shuffle=False)
    got = list(loader)
    assert calls == {"2.png": 3, "3.png": 4}  # storage.retry's 4 attempts
    assert sorted(waits) == sorted([0.5, 1] + [0.5, 1, 2])
    assert loader.stats["skipped_bad_image"] == 2 and loader.stats["examples"] == NUM_RECORDS - 2
    vocab = processor.tokenizer.get_vocab()
    answers = [vocab[f"answer{i}"] for i in range(NUM_RECORDS)]
    ids = [answers.index(int(b["labels"][0][b["labels"][0] >= 0][0])) for b in got]
    assert ids == [0, 2, 4, 5]

    local_batches = list(make_loader(processor, local, batch_size=1, shuffle=False))  # 0, 2, 3, 4, 5
    assert_same_batches(got, local_batches[:2] + local_batches[3:])


def test_vcr_meta_files_are_read_from_a_bucket_image_folder(tmp_path, gcs_bucket):
    """A VCR record's `./dataset/...`, relative and gs:// meta paths resolve in the bucket (the
    URL kept whole) and mark the image as the local folder does."""
    from vipllava_jax.processing.regions import RegionError, mark_record

    meta = json.dumps({"boxes": [[20, 30, 150, 160, 0.9]], "segms": [[[[85, 30], [150, 95], [85, 160], [20, 95]]]]})
    (tmp_path / "vcr").mkdir()
    (tmp_path / "vcr" / "3.json").write_text(meta)
    (storage.path(gcs_bucket) / "imgs" / "vcr" / "3.json").write_text(meta)
    choices = [[[0], "is", "running", "."], ["No", "."], ["Yes", "."], ["Maybe", "."]]
    record = {"id": "vcr-train-3", "image": "3.jpg", "meta_dir": "./dataset/vcr/3.json",
              "question": ["What", "is", [0], "doing", "?"], "answer_choices": choices, "answer_label": 0,
              "rationale_choices": choices, "rationale_label": 1, "class_names": ["person"]}
    image = PIL.Image.new("RGB", (200, 180), (128, 128, 128))

    def mark(folder, **change):
        drawn, conversation = mark_record({**record, **change}, image, np.random.default_rng(0), image_folder=folder)
        return np.asarray(drawn), conversation

    want, conversation = mark(tmp_path)
    assert not np.array_equal(want, np.asarray(image))
    for folder, meta_dir in [(f"{gcs_bucket}/imgs", "./dataset/vcr/3.json"), (f"{gcs_bucket}/imgs", "vcr/3.json"),
                             (str(tmp_path), f"{gcs_bucket}/imgs/vcr/3.json")]:
        got, got_conversation = mark(folder, meta_dir=meta_dir)
        np.testing.assert_array_equal(got, want)
        assert got_conversation == conversation
    with pytest.raises(RegionError, match=f"the VCR meta file {gcs_bucket}/imgs/vcr/4.json does not exist"):
        mark(f"{gcs_bucket}/imgs", meta_dir="./dataset/vcr/4.json")

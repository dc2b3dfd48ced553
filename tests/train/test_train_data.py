"""The training data pipeline: label masking, truncation, order, sharding, resuming and bad
records, on a word-level tokenizer and tiny PNGs made here."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from tests.helpers import IMAGE_TOKEN, make_word_tokenizer
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import TEMPLATES, build_prompt
from vipllava_jax.train.data import (
    IGNORE_INDEX,
    ConversationEncoder,
    LoaderOptions,
    TrainDataLoader,
    conversation_prompt,
    normalize_conversation,
)

IMAGE_SIZE = 28
NUM_IMAGE_TOKENS = 4
NUM_RECORDS = 10
SEPARATORS = {"vipllava": "###", "llava_v1": "</s>"}
Q1, A1 = "What is inside the red rectangle?", "A cat sitting on a chair."
Q2, A2 = "Is the dog near the blue ellipse?", "No it is far away"
CORPUS = [build_prompt([(Q1, A1), (Q2, A2)], t) for t in TEMPLATES] + [
    "long filler",
    " ".join(f"answer{i}" for i in range(NUM_RECORDS)),
]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tokenizer = make_word_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS)
    return VipLlavaProcessor(tokenizer, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS)


def conversation(question=Q1, answer=A1, *more):
    """A LLaVA conversation: the image placeholder in the first question, then more pairs."""
    messages = [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer},
    ]
    for q, a in zip(more[::2], more[1::2]):
        messages += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return messages


def write_dataset(folder, records, *, jsonl=True, bad_lines=()):
    """Writes tiny PNGs for the records' images and the annotation file; returns its path.

    `bad_lines` are raw strings inserted as extra lines (JSONL) at their given 1-based line.
    """
    rng = np.random.default_rng(0)
    for r in records:
        if isinstance(r, dict) and r.get("image") and not r.get("_missing"):
            shape = (int(rng.integers(20, 40)), int(rng.integers(20, 40)), 3)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(folder / r["image"])
    clean = [{k: v for k, v in r.items() if k != "_missing"} for r in records]
    if not jsonl:
        path = folder / "data.json"
        path.write_text(json.dumps(clean, indent=1))
        return path
    lines = [json.dumps(r) for r in clean]
    for number, text in sorted(bad_lines):
        lines.insert(number - 1, text)
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def numbered_records(n=NUM_RECORDS):
    """Records whose one-word answer `answer{i}` identifies them in a batch."""
    return [
        {"id": str(i), "image": f"{i}.png", "conversations": conversation(Q1, f"answer{i}")}
        for i in range(n)
    ]


def record_ids(batch, processor):
    """The record number of each row, read from its first labelled token."""
    vocab = processor.tokenizer.get_vocab()
    by_id = {vocab[f"answer{i}"]: i for i in range(NUM_RECORDS)}
    return [by_id[int(row[row != IGNORE_INDEX][0])] for row in batch["labels"]]


def make_loader(processor, path, **kw):
    """A loader over `path` with `LoaderOptions` fields `kw` (defaults: batches of 2, length 64,
    one host, two worker threads)."""
    options = LoaderOptions(**{"batch_size": 2, "max_length": 64, "process_index": 0,
                               "process_count": 1, "num_workers": 2, **kw})
    return TrainDataLoader(path, path.parent, processor, options)


def take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("template", ["vipllava", "llava_v1"])
def test_labels_are_exactly_the_answers_and_separators(processor, template):
    encoder = ConversationEncoder(processor, template)
    example = encoder(conversation(Q1, A1, Q2, A2))
    ids, labels = example.input_ids, example.labels
    sep = SEPARATORS[template]

    # The prompt is build_prompt's and tokenizes as the inference processor does.
    prompt, _ = conversation_prompt(normalize_conversation(conversation(Q1, A1, Q2, A2)), template)
    assert prompt == build_prompt([(Q1, A1), (Q2, A2)], template)
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    np.testing.assert_array_equal(ids, processor(prompt, image)["input_ids"][0])

    kept = labels != IGNORE_INDEX
    np.testing.assert_array_equal(labels[kept], ids[kept])
    tok = processor.tokenizer
    want = [i for a in (A1, A2) for i in tok.encode(a + sep, add_special_tokens=False)]
    assert labels[kept].tolist() == want
    decoded = tok.decode(labels[kept].tolist())
    assert decoded.split() == tok.decode(want).split()
    assert "".join(decoded.split()) == "".join((A1 + sep + A2 + sep).split())
    assert np.sum(ids == IMAGE_TOKEN) == NUM_IMAGE_TOKENS
    assert np.all(labels[ids == IMAGE_TOKEN] == IGNORE_INDEX)
    # The labels start right after the assistant's role: "Assistant", ":" | "A", "cat", ...
    first = np.flatnonzero(kept)[0]
    assistant = TEMPLATES[template].roles[1]
    assert tok.convert_ids_to_tokens(ids[first - 2 : first].tolist()) == [assistant, ":"]


@pytest.mark.parametrize("template", ["vipllava", "llava_v1"])
def test_labels_with_a_sentencepiece_style_tokenizer(template):
    """Spaces live inside tokens (`▁cat`); tokens are subwords that ignore word boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=["<image>"],
    )
    proc = VipLlavaProcessor(fast, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS)
    example = ConversationEncoder(proc, template)(conversation(Q1, A1, Q2, A2))
    kept = example.labels != IGNORE_INDEX
    sep = SEPARATORS[template]
    # The space before each answer is labelled too (the decoder drops the very first one).
    assert fast.decode(example.input_ids[kept].tolist()) == f"{A1}{sep} {A2}{sep}"
    prompt = build_prompt([(Q1, A1), (Q2, A2)], template)
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    np.testing.assert_array_equal(example.input_ids, proc(prompt, image)["input_ids"][0])


def test_image_placeholder_moves_to_the_first_question():
    turns = normalize_conversation([
        {"from": "gpt", "value": "dropped"},
        {"from": "human", "value": "Look here <image>"}, {"from": "gpt", "value": "ok"},
        {"from": "human", "value": "unanswered"},
    ])
    assert turns == [("<image>\nLook here", "ok")]


def test_batches_have_static_shapes_and_one_image_per_row(processor, tmp_path):
    path = write_dataset(tmp_path, numbered_records())
    loader = make_loader(processor, path, num_epochs=1, batch_size=3)
    batches = list(loader)
    assert len(batches) == 3 and loader.stats["examples"] == NUM_RECORDS  # 10 // 3, rest dropped
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == (3, 64)
        assert batch["attention_mask"].shape == (3, 64)
        for key in ("input_ids", "attention_mask", "labels"):
            assert batch[key].dtype == np.int32
        assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch["pixel_values"].dtype == np.float32
        assert np.all(np.sum(batch["input_ids"] == IMAGE_TOKEN, axis=1) == NUM_IMAGE_TOKENS)
        pad = batch["attention_mask"] == 0
        assert np.all(batch["labels"][pad] == IGNORE_INDEX)
        assert np.all(batch["input_ids"][pad] == processor.pad_token_id)
        lengths = batch["attention_mask"].sum(1)  # right padding: ones, then zeros
        assert np.all(batch["attention_mask"] == (np.arange(64) < lengths[:, None]))


def test_truncation_is_counted_and_never_cuts_the_image(processor, tmp_path):
    filler = " ".join(["long filler"] * 30)
    records = [
        {"image": "short.png", "conversations": conversation(Q1, A1)},
        {"image": "long_answer.png", "conversations": conversation(Q1, f"{A1} {filler}")},
        {"image": "long_question.png", "conversations": conversation(f"{Q1} {filler}", A1)},
    ]
    path = write_dataset(tmp_path, records)
    encoder = ConversationEncoder(processor)
    short = len(encoder(records[0]["conversations"]).input_ids)
    loader = make_loader(processor, path, batch_size=1, max_length=short + 5, num_epochs=1,
                         shuffle=False)
    batches = list(loader)
    assert len(batches) == 2
    assert loader.stats["truncated"] == 1 and loader.stats["skipped_no_targets"] == 1
    cut = batches[1]
    assert cut["attention_mask"].all()  # filled to max_length
    assert np.sum(cut["labels"] != IGNORE_INDEX) > 0

    image_end = encoder(records[0]["conversations"]).image_start + NUM_IMAGE_TOKENS
    loader = make_loader(processor, path, batch_size=1, max_length=image_end - 1, num_epochs=1)
    with pytest.raises(VipLlavaError, match="no usable record"):
        list(loader)
    assert loader.stats["skipped_image_truncated"] == 3
    assert loader.stats["skipped_no_targets"] == 0


def test_order_is_deterministic_per_seed_and_epoch(processor, tmp_path):
    path = write_dataset(tmp_path, numbered_records())

    def order(seed):
        loader = make_loader(processor, path, batch_size=1, seed=seed, num_epochs=2)
        return [record_ids(b, processor)[0] for b in loader]

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    assert sorted(first[:NUM_RECORDS]) == sorted(first[NUM_RECORDS:]) == list(range(NUM_RECORDS))
    assert first[:NUM_RECORDS] != first[NUM_RECORDS:]  # reshuffled each epoch
    inline = make_loader(processor, path, batch_size=1, seed=0, num_epochs=2, num_workers=0)
    assert [record_ids(b, processor)[0] for b in inline] == first


def test_hosts_read_disjoint_shares_covering_all(processor, tmp_path):
    path = write_dataset(tmp_path, numbered_records())
    seen = []
    for host in range(2):
        loader = make_loader(processor, path, batch_size=1, num_epochs=1, process_index=host,
                             process_count=2, seed=3)
        seen.append({record_ids(b, processor)[0] for b in loader})
        assert len(seen[-1]) == loader.records_per_epoch == NUM_RECORDS // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_RECORDS))


def test_resume_from_state_dict_continues_identically(processor, tmp_path):
    path = write_dataset(tmp_path, numbered_records())
    loader = make_loader(processor, path, batch_size=3, seed=7)
    take(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 5)  # iterating again continues; crosses two epoch boundaries

    resumed = make_loader(processor, path, batch_size=3, seed=7)
    resumed.load_state_dict(state)
    got = take(resumed, 5)
    for a, b in zip(expected, got, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert resumed.state_dict() == loader.state_dict()

    with pytest.raises(VipLlavaError, match="seed"):
        make_loader(processor, path, batch_size=3, seed=8).load_state_dict(state)


def test_bad_records_are_skipped_and_counted(processor, tmp_path):
    records = numbered_records(4)
    records[1]["_missing"] = True  # the image file is never written
    records[2].pop("image")  # text-only
    records.append({"image": "x.png", "conversations": [{"from": "gpt", "value": "hi"}]})
    path = write_dataset(tmp_path, records, bad_lines=[(3, '{"id": "broken", ')])
    loader = make_loader(processor, path, batch_size=1, num_epochs=1)
    got = sorted(record_ids(b, processor)[0] for b in loader)
    assert got == [0, 3]
    stats = loader.stats
    assert stats["examples"] == 2 and stats["batches"] == 2
    assert stats["skipped_bad_json"] == 1 and stats["skipped_bad_image"] == 1
    assert stats["skipped_no_image"] == 1 and stats["skipped_malformed"] == 1

    with pytest.raises(VipLlavaError, match=r"data.jsonl line 3: invalid JSON"):
        make_loader(processor, path, strict=True)
    path = write_dataset(tmp_path, records[:4])  # no bad line; record 1's image is missing
    with pytest.raises(VipLlavaError, match=r"data.jsonl line 2: cannot read image .*1.png"):
        list(make_loader(processor, path, strict=True, batch_size=1, num_epochs=1, shuffle=False))


def test_worker_processes_load_what_threads_load(processor, tmp_path):
    """worker_type="processes": the same batches, skips and stats as threads; a strict error
    still names the record's line."""
    records = numbered_records(8)
    records[1]["_missing"] = True  # its image is never written
    path = write_dataset(tmp_path, records, bad_lines=[(3, '{"id": "broken", ')])
    kw = dict(batch_size=2, num_epochs=2, seed=3)
    threads, processes = make_loader(processor, path, **kw), make_loader(
        processor, path, worker_type="processes", **kw)
    expected, got = list(threads), list(processes)
    assert len(got) == len(expected) == 7  # 7 usable records x 2 epochs, in pairs
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert processes.stats == threads.stats
    assert processes.stats["skipped_bad_image"] == 2 and processes.stats["skipped_bad_json"] == 2

    with pytest.raises(VipLlavaError, match=r"data.jsonl line 2: cannot read image .*1.png"):
        list(make_loader(processor, write_dataset(tmp_path, records), strict=True, batch_size=1,
                         num_epochs=1, shuffle=False, worker_type="processes"))
    with pytest.raises(VipLlavaError, match="worker_type must be one of"):
        make_loader(processor, path, worker_type="fibers")


def test_json_list_files(processor, tmp_path):
    path = write_dataset(tmp_path, numbered_records(4), jsonl=False)
    loader = make_loader(processor, path, batch_size=2, num_epochs=1, shuffle=False)
    assert [record_ids(b, processor) for b in loader] == [[0, 1], [2, 3]]
    path.write_text('[{"id": 1},\n{"id": ')
    with pytest.raises(VipLlavaError, match="data.json line 2: invalid JSON"):
        make_loader(processor, path)


def test_loader_options_with_keyword_overrides(processor, tmp_path):
    path = write_dataset(tmp_path, numbered_records(4))
    options = LoaderOptions(batch_size=2, max_length=64, process_index=0, process_count=1, num_workers=0)
    loader = TrainDataLoader(path, path.parent, processor, options, seed=5)
    assert loader.options == LoaderOptions.merge(options, seed=5) != options
    assert loader.state_dict()["seed"] == 5
    with pytest.raises(VipLlavaError, match="batch_size must be positive"):
        LoaderOptions(batch_size=0, max_length=64)
    with pytest.raises(VipLlavaError, match="leaves no room next to"):
        TrainDataLoader(path, path.parent, processor, options, max_length=NUM_IMAGE_TOKENS)

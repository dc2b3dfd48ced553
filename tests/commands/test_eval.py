"""vipllava-eval's scoring on hand-made predictions, against hand-counted expectations."""

import json

import pytest

from vipllava_jax.embedded import EMBEDDED_MODEL, EMBEDDED_TEST_SPLIT
from vipllava_jax.errors import VipLlavaError
from vipllava_jax.evaluation.evaluate import (
    detect_format,
    format_table,
    load_questions,
    normalize,
    score,
    summarize,
)


def test_exact_match_is_normalised():
    assert normalize("  White. ") == "white"
    assert score("White.", "white")
    assert score(" two\n", "Two")
    assert not score("white square", "white")
    assert not score("", "white")


def test_letter_references_take_the_first_letter_of_the_prediction():
    assert score("B", "B")
    assert score("b) a cat", "B")
    assert score("(C)", "C.")
    assert not score("A", "B")
    assert not score("The answer is B", "B")  # first letter is T: no answer extraction
    assert not score("", "D")
    assert score("e", "E") and not score("egg", "E")  # E is no choice letter: exact match


# Hand-made predictions: category, pair, reference, prediction, right?
ROWS = [
    ("color", "p1", "white", "White.", True),
    ("color", "p1", "black", "black", True),  # pair p1: both right
    ("shape", "p2", "circle", "circle", True),
    ("shape", "p2", "square", "circle", False),  # pair p2: one wrong
    ("count", "p3", "two", "three", False),
    ("count", "p3", "one", "two", False),  # pair p3: both wrong
    ("choice", None, "B", "b", True),
    ("choice", None, "C", "A", False),
    ("choice", "p4", "D", "D. yes", True),  # a pair of one record does not count
]


def test_summary_of_a_hand_made_prediction_file(tmp_path):
    file = tmp_path / "preds.jsonl"
    with open(file, "w") as f:
        for i, (cat, pair, ref, pred, _) in enumerate(ROWS):
            f.write(json.dumps({"id": i, "category": cat, "pair": pair, "reference": ref,
                                "prediction": pred}) + "\n")
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    for r, expected in zip(rows, ROWS):
        r["correct"] = score(r["prediction"], r["reference"])
        assert r["correct"] == expected[-1], r
    s = summarize(rows)
    assert (s["correct"], s["total"]) == (5, 9)
    cats = {k: (v["correct"], v["total"]) for k, v in s["categories"].items()}
    assert cats == {"choice": (2, 3), "color": (2, 2), "count": (0, 2), "shape": (1, 2)}
    assert (s["pairs"]["correct"], s["pairs"]["total"]) == (1, 3)
    table = format_table(s)
    assert "all               9     55.6%" in table
    assert "pairs             3     33.3%" in table
    assert summarize([{"correct": True}])["pairs"] is None


def test_questions_are_the_first_turn_with_images_beside_the_data(tmp_path):
    record = {"id": "x", "image": "a.png", "category": "color", "pair": "p", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And?"}, {"from": "gpt", "value": "blue"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(record) + "\n")
    (q,) = load_questions(tmp_path / "d.jsonl")
    assert (q.question, q.reference, q.image) == ("What color?", "red", str(tmp_path / "a.png"))
    assert (q.category, q.pair) == ("color", "p")
    assert load_questions(tmp_path / "d.jsonl", "imgs")[0].image == "imgs/a.png"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": 1, "conversations": []}) + "\n")
    with pytest.raises(VipLlavaError, match="record 0: needs an image"):
        load_questions(tmp_path / "bad.jsonl")


# -- the command ------------------------------------------------------------------------------

def test_eval_defaults_to_the_embedded_model_and_its_test_split(capsys):
    from vipllava_jax.evaluation.cli import main

    assert main(["--limit", "4", "--batch-size", "2"]) == 0
    out = capsys.readouterr()
    assert "all               4    100.0%" in out.out
    assert "answering" in out.err  # the progress bar, 2 batches
    assert "2/2" in out.err


@pytest.mark.parametrize("flags, message", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--out", "."], "is a folder"),
])
def test_eval_bad_flags_are_one_line_errors_before_any_work(capsys, flags, message):
    from vipllava_jax.evaluation.cli import main

    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_eval_out_is_checked_before_answering(tmp_path):
    from vipllava_jax.evaluation.evaluate import evaluate

    class NoModel:
        def generate(self, *a, **k):
            raise AssertionError("answered before checking --out")

    with pytest.raises(VipLlavaError, match="is a folder"):
        evaluate("unused", "unused.jsonl", out=tmp_path, model=NoModel(), processor=object())
    with pytest.raises(VipLlavaError, match="limit must be >= 1"):
        evaluate("unused", "unused.jsonl", limit=0, model=NoModel(), processor=object())


def test_conversations_as_strings_are_one_line_errors(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"image": "a.png", "conversations": ["what?", "white"]}) + "\n")
    with pytest.raises(VipLlavaError, match="record 0: conversations must be a list") as e:
        load_questions(data)
    assert "\n" not in str(e.value)
    data.write_text(json.dumps({"image": "a.png", "conversations": "what? white"}) + "\n")
    with pytest.raises(VipLlavaError, match="record 0: conversations must be a list"):
        load_questions(data)


# -- ViP-Bench questions and region records -------------------------------------------------

TEST_IMAGES = sorted((EMBEDDED_TEST_SPLIT.parent / "images" / "test").glob("*.png"))


def test_vip_bench_questions_get_the_answers_file_its_grader_reads(tmp_path, capsys):
    """ViP-Bench's questions.jsonl in, LLaVA model_vqa's answer records out, in question order."""
    from vipllava_jax.evaluation.cli import main

    questions = [{"question_id": qid, "image": TEST_IMAGES[i].name, "text": text}
                 for i, (qid, text) in enumerate([
                     ("v1_0", "What is the color of the object within the red rectangle?"),
                     ("v1_1", "What shape is marked?"), ("v1_2", "Describe the marked object.")])]
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    assert detect_format(questions[0]) == "vip-bench"
    out = tmp_path / "answers.jsonl"
    assert main(["--data", str(data), "--image-folder", str(TEST_IMAGES[0].parent), "--out", str(out),
                 "--batch-size", "2", "--max-new-tokens", "3", "--no-progress"]) == 0
    assert "answered 3 ViP-Bench questions" in capsys.readouterr().out
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["question_id"] for a in answers] == ["v1_0", "v1_1", "v1_2"]
    for a, q in zip(answers, questions):
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["prompt"] == q["text"] and a["metadata"] == {}
        assert isinstance(a["text"], str) and a["model_id"] == EMBEDDED_MODEL.name
    assert len({a["answer_id"] for a in answers}) == 3


def _region_records(tmp_path):
    """Three v7w records (the answer box is option B, C, A) and one pointQA_twice record."""
    from PIL import Image

    for k, colour in enumerate(["gray", "white"]):
        Image.new("RGB", (120, 90), colour).save(tmp_path / f"r{k}.png")
    boxes = [[5, 5, 30, 30], [40, 10, 70, 40], [80, 50, 110, 80], [10, 50, 40, 85]]
    return [
        {"id": "v7w-1", "image": "r0.png", "question": "Which is the cup?", "bboxes": boxes, "answer": boxes[1]},
        {"id": "v7w-2", "image": "r1.png", "question": "Which is the dog?", "bboxes": boxes, "answer": boxes[2]},
        {"id": "v7w-3", "image": "r0.png", "question": "Which is red?", "bboxes": boxes, "answer": boxes[0]},
        {"id": "pointQA_twice-4", "image": "r1.png", "question": "What color is it?", "bboxes": boxes[:1],
         "answer": "white"},
    ]


def test_region_records_are_marked_per_record_and_scored_by_letter(tmp_path):
    from vipllava_jax.evaluation.evaluate import evaluate, mark_question

    records = _region_records(tmp_path)
    data = tmp_path / "v7w.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert detect_format(records[0]) == "regions"
    qs = [mark_question(q) for q in load_questions(data)]
    # the original's v7w question: the question, one option per box, the letter instruction
    lines = qs[0][0].question.splitlines()
    assert lines[0] == "Which is the cup?" and len(lines) == 6
    assert [ln[:3] for ln in lines[1:5]] == ["A. ", "B. ", "C. ", "D. "]
    assert lines[5] == "Answer with the option's letter from the given choices directly."
    assert [q.reference for q, _ in qs] == ["B", "C", "A", "white"]
    assert qs[0][1].size == (120, 90) and qs[0][1].getpixel((17, 5)) != (128, 128, 128)  # drawn
    # each record has its own seed: the same markers whatever comes before it
    (tmp_path / "one.jsonl").write_text(json.dumps(records[0]) + "\n")
    alone = mark_question(load_questions(tmp_path / "one.jsonl")[0])
    assert alone[0].question == qs[0][0].question
    assert alone[1].tobytes() == qs[0][1].tobytes()

    out = tmp_path / "answers.jsonl"
    summary, rows = evaluate(EMBEDDED_MODEL, data, batch_size=4, max_new_tokens=2, out=out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == rows and [r["id"] for r in rows] == [r["id"] for r in records]
    assert [r.get("reference_letter") for r in rows] == ["B", "C", "A", None]
    for r in rows[:3]:
        assert r["correct"] == (r["predicted_letter"] == r["reference_letter"])
    assert summary["total"] == 4 and summary["accuracy"] == sum(r["correct"] for r in rows) / 4
    assert set(summary["categories"]) == {"v7w", "pointQA_twice"}
    assert summary["letters"] == {r["id"]: {"reference": r["reference_letter"], "predicted": r["predicted_letter"]}
                                  for r in rows[:3]}


def test_malformed_region_records_are_one_line_errors(tmp_path):
    from vipllava_jax.evaluation.evaluate import mark_question

    record = _region_records(tmp_path)[0]
    record["answer"] = [1, 2, 3, 4]
    (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(VipLlavaError, match="record v7w-1: the v7w answer") as e:
        mark_question(load_questions(tmp_path / "bad.jsonl")[0])
    assert "\n" not in str(e.value)

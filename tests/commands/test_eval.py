"""vipllava-eval's scoring on hand-made predictions, against hand-counted expectations."""

import json

import pytest

from vipllava_jax.errors import VipLlavaError
from vipllava_jax.evaluation.evaluate import format_table, load_questions, normalize, score, summarize


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

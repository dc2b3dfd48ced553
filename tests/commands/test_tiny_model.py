"""The embedded tiny VipLlava: accuracy on the held-out test split, and the same answers from
transformers' PyTorch `generate` after `vipllava-convert orbax-to-hf`."""

import numpy as np
import pytest
import torch

from tools.synthetic import CATEGORIES
from vipllava_jax.embedded import EMBEDDED_MODEL, EMBEDDED_TEST_SPLIT
from vipllava_jax.evaluation.evaluate import evaluate, load_questions
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.processing.prompts import build_prompt, cut_answer, stop_tokens

TEST_SPLIT = EMBEDDED_TEST_SPLIT
N = 64  # the first 32 marked-twin pairs, all five categories


@pytest.fixture(scope="module")
def jax_eval():
    summary, rows = evaluate(EMBEDDED_MODEL, TEST_SPLIT, batch_size=32, max_new_tokens=4, limit=N)
    return summary, rows


def test_shipped_model_answers_about_the_marked_object(jax_eval):
    """The issue's targets on a slice of the held-out test split: 95% of the questions and 90%
    of the marked-twin pairs (each scene twice, the marker on objects whose answers differ, so
    a model that ignores the marker gets no pair right). The whole split: 98.5%, pairs
    97.0% (make.sh's eval)."""
    summary, rows = jax_eval
    assert summary["total"] == N and len(summary["categories"]) == 5
    assert summary["accuracy"] >= 0.95, summary
    assert summary["pairs"]["total"] == N // 2 and summary["pairs"]["accuracy"] >= 0.9, summary


def test_shipped_model_answers_every_question_type(jax_eval):
    """Each of the five question types on its own: the colour ones (its colour, the colour
    right of it, how many objects share it) and the shape ones (its shape, the shape left of
    it), so that a type the model has not learned is not hidden by the others' average."""
    summary, rows = jax_eval
    for category in CATEGORIES:
        answers = [r["correct"] for r in rows if r["category"] == category]
        assert len(answers) >= N // 10 and np.mean(answers) >= 0.8, (category, summary["categories"])


def test_exported_model_gives_the_same_answers_in_transformers(jax_eval, tmp_path):
    from transformers import VipLlavaForConditionalGeneration

    from vipllava_jax.convert.cli import main as convert

    assert convert(["orbax-to-hf", str(EMBEDDED_MODEL), str(tmp_path / "hf")]) == 0
    ref = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    processor = VipLlavaProcessor.from_pretrained(tmp_path / "hf")  # the tokenizer travelled along
    eos, stops = stop_tokens(processor.tokenizer)
    questions = load_questions(TEST_SPLIT)[:N]
    answers = []
    for start in range(0, N, 32):
        chunk = questions[start:start + 32]
        inputs = processor(text=[build_prompt(q.question) for q in chunk], images=[q.image for q in chunk])
        with torch.no_grad():
            out = ref.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, max_new_tokens=4,
                               do_sample=False, eos_token_id=eos, pad_token_id=processor.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:].numpy()
        answers += [cut_answer(t, stops).replace("<pad>", "").strip()
                    for t in processor.batch_decode(new, skip_special_tokens=False)]
    _, rows = jax_eval
    assert answers == [r["prediction"] for r in rows]
    assert np.mean([a == q.reference for a, q in zip(answers, questions)]) == jax_eval[0]["accuracy"]

"""Fixtures of the training tests: `workspace`, a converted tiny model with its data."""

import json

import numpy as np
import PIL.Image
import pytest

from tests.helpers import make_hf_model, make_word_tokenizer
from vipllava_jax.convert import hf_to_orbax
from vipllava_jax.processing.prompts import build_prompt

QUESTIONS = ["What is inside the red rectangle ?", "What does the arrow point at ?"]
ANSWERS = ["a cat on a chair", "a dog near the door", "the red car", "two small birds"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A converted tiny model with a tokenizer, and 8 LLaVA-format records with images."""
    root = tmp_path_factory.mktemp("train")
    hf = make_hf_model(seed=1)
    hf.save_pretrained(root / "hf")
    make_word_tokenizer(root / "hf", [build_prompt(q) for q in QUESTIONS] + ANSWERS + ["###"])
    hf_to_orbax(root / "hf", root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    with open(root / "data.jsonl", "w") as f:
        for i in range(8):
            PIL.Image.fromarray(rng.integers(0, 256, (28, 28, 3), np.uint8)).save(root / "images" / f"{i}.png")
            record = {"id": str(i), "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\n" + QUESTIONS[i % 2]},
                {"from": "gpt", "value": ANSWERS[i % 2]},  # determined by the question
            ]}
            f.write(json.dumps(record) + "\n")
    return root

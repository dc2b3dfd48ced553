"""vipllava-generate end to end: converted tiny model + tokenizer + image file -> answer text,
equal to transformers' greedy generate on the same inputs."""

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import IMAGE_TOKEN, make_hf_model, make_word_tokenizer
from vipllava_jax.checkpoint import hf_to_orbax
from vipllava_jax.generate_cli import main
from vipllava_jax.processor import VipLlavaProcessor
from vipllava_jax.prompts import build_prompt

QUESTION = "What is inside the red rectangle ?"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf = make_hf_model(seed=3)
    hf.save_pretrained(root / "hf")
    tokenizer = make_word_tokenizer(root / "hf", [build_prompt(QUESTION), "a cat on a chair"])
    assert tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN
    hf_to_orbax(root / "hf", root / "orbax")
    image = root / "image.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)).save(image)
    return hf, root, image


def reference_answer(hf, folder, image, max_new_tokens):
    processor = VipLlavaProcessor.from_pretrained(folder)
    inputs = processor(text=build_prompt(QUESTION), images=[str(image)])
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(inputs["input_ids"]), pixel_values=torch.tensor(inputs["pixel_values"]),
            attention_mask=torch.tensor(inputs["attention_mask"]), max_new_tokens=max_new_tokens,
            do_sample=False, eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.pad_token_id,
        )
    return processor.decode(out[0, inputs["input_ids"].shape[1]:].numpy())


@pytest.mark.parametrize("stream", [False, True])
def test_cli_answer_equals_transformers(converted, capsys, stream):
    hf, root, image = converted
    args = ["--model", str(root / "orbax"), "--image", str(image), "--prompt", QUESTION,
            "--max-new-tokens", "6"] + (["--stream"] if stream else [])
    assert main(args) == 0
    printed = capsys.readouterr().out.strip()
    assert printed and printed == reference_answer(hf, root / "hf", image, 6).strip()


def test_cli_bad_image_path_is_one_clear_line(converted, capsys):
    _, root, _ = converted
    assert main(["--model", str(root / "orbax"), "--image", "/nonexistent.png", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nonexistent.png" in err[0]

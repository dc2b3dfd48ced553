"""Hub ids resolve through huggingface_hub's cache, offline, from a cache laid out here as the
hub writes it (models--org--name/snapshots/<rev>/..., refs/<branch>)."""

from __future__ import annotations

import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from tests.helpers import make_inputs, make_word_tokenizer, torch_forward
from vipllava_jax import CheckpointError, VipLlavaForConditionalGeneration, VipLlavaProcessor
from vipllava_jax.hub import is_hub_id, resolve

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_hf):
    """An offline HF cache holding the tiny model as `org/tiny-vipllava` at main, plus a
    `.bin`-only copy at a second revision."""
    _, folder = tiny_hf
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-vipllava"
    snap = repo / "snapshots" / REV
    shutil.copytree(folder, snap)
    make_word_tokenizer(snap, ["what is in the box ?"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    bin_rev = "f" * 40
    bin_snap = repo / "snapshots" / bin_rev
    bin_snap.mkdir()
    shutil.copy(snap / "config.json", bin_snap / "config.json")
    state = {k: v for k, v in tiny_hf[0].state_dict().items()}
    torch.save(state, bin_snap / "pytorch_model.bin")
    (repo / "refs" / "bin-only").write_text(bin_rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_shapes(tmp_path):
    assert is_hub_id("llava-hf/vip-llava-7b-hf") and is_hub_id("gpt2")
    assert not is_hub_id(tmp_path) and not is_hub_id("./model") and not is_hub_id("a/b/c")


def test_from_pretrained_reads_a_cached_hub_id_offline(hub_cache, tiny_hf):
    hf, _ = tiny_hf
    inputs = make_inputs(hf.config)
    expected, _ = torch_forward(hf, inputs)
    for revision in (None, "bin-only"):  # safetensors at main, PyTorch .bin at the branch
        model = VipLlavaForConditionalGeneration.from_pretrained("org/tiny-vipllava", revision=revision)
        logits = np.asarray(model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]).logits)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert resolve("org/tiny-vipllava").name == REV


def test_a_missing_hub_id_is_one_clear_line(hub_cache):
    with pytest.raises(CheckpointError, match=r"'org/missing' is neither a local folder nor a model in the local"):
        VipLlavaForConditionalGeneration.from_pretrained("org/missing")
    with pytest.raises(CheckpointError, match="revision="):
        resolve(hub_cache, revision="main")


def test_convert_command_takes_a_hub_id(hub_cache, tiny_hf, tmp_path, capsys):
    from vipllava_jax.convert.cli import main

    hf, _ = tiny_hf
    assert main(["hf-to-orbax", "org/tiny-vipllava", str(tmp_path / "orbax")]) == 0
    inputs = make_inputs(hf.config)
    expected, _ = torch_forward(hf, inputs)
    model = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "orbax")
    logits = np.asarray(model(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]).logits)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert main(["hf-to-orbax", "org/missing", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the first run's progress bars
    assert err.startswith("vipllava-convert: error: 'org/missing' is neither a local folder nor a model"), err


def test_processor_takes_a_hub_id(hub_cache):
    processor = VipLlavaProcessor.from_pretrained("org/tiny-vipllava")
    assert processor.num_image_tokens == 4 and processor.image_token_id == 100

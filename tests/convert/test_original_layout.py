"""The original ViP-LLaVA repository's layout (LlavaLlamaForCausalLM, model_type llava_llama):
a tiny checkpoint written here as that repository writes it (from a tiny transformers VipLlava,
its keys renamed back, its vocabulary cut to the original's and its tokenizer without <image>)
converts, gives transformers' logits on every original-vocabulary column, and exports to a
folder transformers loads with no missing keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.original import V0
from vipllava_jax import CheckpointError, VipLlavaForConditionalGeneration
from vipllava_jax.convert import hf_to_orbax, orbax_to_hf
from vipllava_jax.convert.cli import main


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V0, (2, 12))
    ids[:, 2:6] = V0  # 4 image tokens per row (28 px / 14 px patches)
    pixels = rng.standard_normal((2, 3, 28, 28)).astype(np.float32)
    return ids, pixels


def test_original_layout_converts_and_matches_transformers(original, tmp_path):
    from transformers import AutoTokenizer
    from transformers import VipLlavaForConditionalGeneration as HF

    hf, folder = original
    ids, pixels = inputs()
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()[..., :V0]

    hf_to_orbax(folder, tmp_path / "orbax")
    ours = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "orbax")
    assert ours.config.text_config.vocab_size == 128 and ours.config.image_token_index == V0
    np.testing.assert_allclose(np.asarray(ours(ids, pixels).logits)[..., :V0], expected, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "orbax")
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [V0, V0 + 1] and tok.pad_token == "<pad>"

    # read directly, the same model
    direct = VipLlavaForConditionalGeneration.from_pretrained(folder)
    np.testing.assert_array_equal(np.asarray(direct(ids, pixels).logits), np.asarray(ours(ids, pixels).logits))
    # the grown rows: seeded (the same each time), finite, near the old rows' mean
    table = np.asarray(ours.language_model.embed_tokens.embedding[...])
    np.testing.assert_array_equal(table, np.asarray(direct.language_model.embed_tokens.embedding[...]))
    old = table[:V0]
    assert np.all(np.isfinite(table[V0:]))
    assert np.abs(table[V0:] - old.mean(0)).max() < np.abs(old - old.mean(0)).max()

    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf")
    back, info = HF.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        again = back.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    np.testing.assert_allclose(again[..., :V0], expected, atol=1e-4)


def test_original_layout_without_its_vision_tower_is_one_line(original, tmp_path, capsys):
    _, folder = original
    stripped = tmp_path / "no_tower"
    stripped.mkdir()
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if ".vision_tower." not in k}, stripped / "pytorch_model.bin")
    (stripped / "config.json").write_text((folder / "config.json").read_text())
    assert main(["hf-to-orbax", str(stripped), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no vision tower" in err[0], err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="holds no vision tower"):
        VipLlavaForConditionalGeneration.from_pretrained(stripped)


def test_a_stage_one_projector_file_applied_onto_its_base(original, tmp_path):
    """The original's two-stage release: a base checkpoint plus `mm_projector.bin` (the
    projector's tensors alone) converts to the same model as the full checkpoint."""
    _, folder = original
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    projector = {k: v for k, v in state.items() if ".mm_projector." in k}
    assert len(projector) == 6
    base = tmp_path / "base"
    base.mkdir()
    for f in folder.iterdir():
        if f.name != "pytorch_model.bin":
            (base / f.name).write_bytes(f.read_bytes())
    torch.save({k: (torch.randn_like(v) if k in projector else v) for k, v in state.items()}, base / "pytorch_model.bin")
    torch.save(projector, tmp_path / "mm_projector.bin")

    assert main(["hf-to-orbax", str(base), str(tmp_path / "applied"), "--projector", str(tmp_path / "mm_projector.bin")]) == 0
    hf_to_orbax(folder, tmp_path / "full")
    ids, pixels = inputs()
    applied = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "applied")
    full = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "full")
    np.testing.assert_array_equal(np.asarray(applied(ids, pixels).logits), np.asarray(full(ids, pixels).logits))

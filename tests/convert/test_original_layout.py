"""The original ViP-LLaVA repository's layout (LlavaLlamaForCausalLM, model_type llava_llama):
a tiny checkpoint written here as that repository writes it (from a tiny transformers VipLlava,
its keys renamed back, its vocabulary cut to the original's and its tokenizer without <image>)
converts, gives transformers' logits on every original-vocabulary column, and exports to a
folder transformers loads with no missing keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vipllava_jax import CheckpointError, VipLlavaForConditionalGeneration
from vipllava_jax.convert import hf_to_orbax, orbax_to_hf
from vipllava_jax.convert.cli import main
from vipllava_jax.models.vipllava.original import grown_vocab

V0 = 120  # the original vocabulary; <image> = 120, <pad> = 121, grown to 128
LAYERS = (-2, -5, -8, -11, 6)  # clip_4layers_336's feature layers


def original_key(key: str) -> str:
    """transformers 5.x's key -> the original repository's."""
    for new, old in (("model.language_model.", "model."),
                     ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
                     ("model.multi_modal_projector.projector_layernorm.", "model.mm_projector.clip_layernorm."),
                     ("model.multi_modal_projector.linear_1.", "model.mm_projector.final_linear.0."),
                     ("model.multi_modal_projector.linear_2.", "model.mm_projector.final_linear.2.")):
        if key.startswith(new):
            return old + key[len(new):]
    return key


def word_tokenizer(path, size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(size - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """(transformers model with the grown vocabulary, folder in the original layout)."""
    from transformers import CLIPVisionConfig, LlamaConfig, VipLlavaConfig
    from transformers import VipLlavaForConditionalGeneration as HF

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=12, num_attention_heads=1,
                              image_size=28, patch_size=14, projection_dim=16)
    text = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=grown_vocab(V0), max_position_embeddings=256,
                       rms_norm_eps=1e-5)
    hf = HF(VipLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=V0,
                           vision_feature_layer=list(LAYERS))).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = tmp_path_factory.mktemp("original")
    state = {}
    for key, value in hf.state_dict().items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            value = value[:V0]  # the original vocabulary
        state[original_key(key)] = value.clone()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"], "hidden_size": 48,
        "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": V0, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32", "mm_vision_tower": "clip_4layers_336",
        "mm_hidden_size": 5 * 64, "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad",
        "mm_vision_select_layer": -2, "mm_use_im_start_end": False,
    }))
    word_tokenizer(folder, V0)
    return hf, folder


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

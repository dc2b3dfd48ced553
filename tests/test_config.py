"""Config reading: every dialect transformers wrote (4.37 ... 5.x), and clear errors."""

import json

import pytest

from tests.helpers import tiny_config
from vipllava_jax import ConfigError, VipLlavaConfig
from vipllava_jax.models.vipllava.config import TextConfig


def test_reads_what_transformers_writes(tmp_path):
    hf = tiny_config(text_model="mistral", num_heads=4, num_kv_heads=2, sliding_window=7)
    hf.save_pretrained(tmp_path)
    cfg = VipLlavaConfig.from_pretrained(tmp_path)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.model_type, t.num_key_value_heads, t.sliding_window) == ("mistral", 2, 7)
    assert (t.hidden_size, t.head_dim, t.vocab_size) == (hf.text_config.hidden_size, hf.text_config.head_dim, 128)
    assert t.rope_theta == hf.text_config.rope_parameters["rope_theta"]
    assert (v.hidden_size, v.image_size, v.patch_size, v.hidden_act) == (32, 28, 14, "quick_gelu")
    assert cfg.vision_feature_layer == tuple(hf.vision_feature_layer)
    assert cfg.image_token_index == hf.image_token_index


def test_written_config_reads_back_in_transformers(tmp_path):
    import transformers

    tiny_config(tied=True).save_pretrained(tmp_path / "a")
    ours = VipLlavaConfig.from_pretrained(tmp_path / "a")
    (tmp_path / "b").mkdir()
    ours.save_pretrained(tmp_path / "b")
    hf = transformers.VipLlavaConfig.from_pretrained(tmp_path / "b")
    assert hf.text_config.num_key_value_heads == 2 and hf.tie_word_embeddings
    assert list(hf.vision_feature_layer) == list(ours.vision_feature_layer)
    assert VipLlavaConfig.from_pretrained(tmp_path / "b") == ours


# The hub's llava-hf/vip-llava-7b-hf config.json as transformers 4.37 wrote it: sparse
# sub-configs (only fields that differ from the class defaults) and the old field names.
OLD_7B = {
    "architectures": ["VipLlavaForConditionalGeneration"],
    "ignore_index": -100, "image_token_index": 32000, "model_type": "vipllava",
    "pad_token_id": 32001, "projector_hidden_act": "gelu", "projector_layernorm_eps": 1e-05,
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0,
        "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064,
    },
    "torch_dtype": "float16", "transformers_version": "4.37.0.dev0",
    "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000,
    },
    "vision_feature_layers": [-2, -5, -8, -11, 6], "vocab_size": 32064,
}


def test_old_sparse_config_gets_transformers_defaults(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(OLD_7B))
    cfg = VipLlavaConfig.from_pretrained(tmp_path)
    t = cfg.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (4096, 32, 32, 11008)
    assert (t.num_key_value_heads, t.head_dim, t.rms_norm_eps, t.rope_theta) == (32, 128, 1e-5, 10000.0)
    assert cfg.vision_feature_layer == (-2, -5, -8, -11, 6)
    assert cfg.dtype == "float16" and cfg.num_image_tokens == 576
    assert not t.tie_word_embeddings and t.sliding_window is None

    import transformers  # and transformers agrees on the fields that matter

    hf = transformers.VipLlavaConfig.from_pretrained(tmp_path)
    assert hf.text_config.intermediate_size == t.intermediate_size
    assert hf.vision_config.hidden_act == cfg.vision_config.hidden_act


def test_single_int_feature_layer():
    cfg = VipLlavaConfig.from_hf_dict({**OLD_7B, "vision_feature_layers": -2})
    assert cfg.vision_feature_layer == -2 and cfg.feature_layer_indices == (-2,)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llava"}, "model_type 'llava'"),
        ({"text_config": {"model_type": "gemma"}}, "text_config model_type 'gemma'"),
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "vision_config model_type"),
        ({"vision_feature_layers": [30]}, "vision_feature_layer 30 is out of range"),
        ({"text_config": {"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}}}, "rope_type 'yarn'"),
        ({"text_config": None}, "text_config must be a JSON object, got NoneType"),
        ({"text_config": [1]}, "text_config must be a JSON object, got list"),
        ({"text_config": {"hidden_size": "abc"}}, "text_config.hidden_size must be a positive integer, got 'abc'"),
        ({"text_config": {"hidden_size": -48}}, "text_config.hidden_size must be a positive integer, got -48"),
        ({"text_config": {"vocab_size": True}}, "text_config.vocab_size must be a positive integer"),
        ({"text_config": {"rms_norm_eps": -1}}, "text_config.rms_norm_eps must be a positive number"),
        ({"vision_config": {"hidden_size": 1000}}, "not a multiple of num_attention_heads"),
        ({"vision_config": {"patch_size": 0}}, "vision_config.patch_size must be a positive integer"),
    ],
)
def test_bad_configs_name_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        VipLlavaConfig.from_hf_dict({**OLD_7B, **change})


def test_missing_or_malformed_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        VipLlavaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        VipLlavaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="config.json must be a JSON object, got list"):
        VipLlavaConfig.from_pretrained(tmp_path)


def test_malformed_ved_configs_name_the_problem(tmp_path):
    from vipllava_jax.models.ved.config import VisionEncoderDecoderConfig

    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        VisionEncoderDecoderConfig.from_pretrained(tmp_path)
    base = {"model_type": "vision-encoder-decoder", "encoder": {"model_type": "vit"},
            "decoder": {"model_type": "gpt2", "is_decoder": True, "add_cross_attention": True}}
    for change, message in [
        ({"encoder": None}, "encoder must be a JSON object"),
        ({"encoder": {"model_type": "vit", "image_size": "abc"}}, "encoder.image_size must be a positive integer"),
        ({"encoder": {"model_type": "vit", "hidden_size": -48}}, "encoder.hidden_size must be a positive integer"),
        ({"decoder": {**base["decoder"], "n_embd": "abc"}}, "decoder.n_embd must be a positive integer"),
    ]:
        with pytest.raises(ConfigError, match=message):
            VisionEncoderDecoderConfig.from_hf_dict({**base, **change})


def test_text_config_defaults_follow_model_type():
    assert TextConfig.from_hf_dict({"model_type": "mistral"}).num_key_value_heads == 8
    assert TextConfig.from_hf_dict({"model_type": "mistral", "sliding_window": None}).sliding_window is None


def test_out_of_range_token_ids_are_one_line_errors(tiny_hf):
    """ids >= vocab would give NaN logits and negative ids would wrap: refused on the host,
    before anything compiles, in forward and in generate."""
    import numpy as np

    from vipllava_jax import VipLlavaError, VipLlavaForConditionalGeneration

    model = VipLlavaForConditionalGeneration.from_pretrained(tiny_hf[1])
    vocab = model.config.text_config.vocab_size
    for bad in (vocab, -1):
        ids = np.array([[1, 5, bad, 7]])
        with pytest.raises(VipLlavaError, match=rf"token id {bad} \(1 out of range\).*\[0, {vocab}\)"):
            model(ids)
        with pytest.raises(VipLlavaError, match=rf"token id {bad}"):
            model.generate(ids, max_new_tokens=2)

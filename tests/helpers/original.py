"""A tiny checkpoint in the original ViP-LLaVA repository's layout, written as that repository
writes it: a tiny transformers VipLlava with its keys renamed back, its vocabulary cut to the
original's and its tokenizer without <image>."""

from __future__ import annotations

import json

import torch

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


def make_original(folder):
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



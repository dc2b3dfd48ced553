"""Tiny random transformers VisionEncoderDecoder models (built and saved by transformers
itself) and their inputs, for the `test_ved_*` files; the `hf_veds` fixture is in tests/conftest.py."""

from __future__ import annotations

import numpy as np
import torch

VOCAB = 61
START, PAD = 1, 0
ATOL = 1e-4

# name -> (encoder type, decoder type, decoder hidden size, tie_word_embeddings[, type_vocab_size])
SHAPES = {
    "vit_gpt2": ("vit", "gpt2", 32, True),
    "vit_bert": ("vit", "bert", 32, True),
    "deit_gpt2_proj": ("deit", "gpt2", 48, False),  # enc_to_dec_proj: 32 -> 48, untied head
    "vit_bert_proj": ("vit", "bert", 48, False),
    "vit_bert_one_type": ("vit", "bert", 32, True, 1),  # a one-row token-type table
    # TrOCR's decoder: cross-attention on the encoder's width (no projection), scaled embeddings
    "deit_trocr": ("deit", "trocr", 48, False, 2, {"cross_attention_hidden_size": 32, "scale_embedding": True}),
    "vit_trocr_sinusoidal": ("vit", "trocr", 32, True, 2,
                             {"use_learned_position_embeddings": False, "layernorm_embedding": False}),
    "vit_bart_proj": ("vit", "bart", 48, True, 2, {}),  # post-norm, enc_to_dec_proj
    "deit_mbart": ("deit", "mbart", 32, False, 2, {"scale_embedding": True}),  # pre-norm, final layer_norm
    "vit_roberta": ("vit", "roberta", 32, True, 1, {}),  # positions from the pad id
    # BEiT: a bias table per layer, layer scale, the final layernorm (TrOCR-base's encoder)
    "beit_trocr": ("beit", "trocr", 32, False, 2, {"encoder": {
        "use_relative_position_bias": True, "use_mean_pooling": False, "layer_scale_init_value": 0.1}}),
    # BEiT: one shared bias table, absolute positions, no layer scale, mean pooling (no final norm)
    "beit_gpt2_shared": ("beit", "gpt2", 32, True, 2, {"encoder": {
        "use_shared_relative_position_bias": True, "use_absolute_position_embeddings": True,
        "layer_scale_init_value": 0.0, "use_mask_token": True}}),
    # Donut's pair (square here); 5 px patches on 32 px: every padding path (pixels to 35, the
    # 7x7 grid to 3x3 windows, the odd grid before merging, the merged 4x4 grid to windows)
    "swin_mbart": ("swin", "mbart", 32, True, 2, {"encoder": {"patch_size": 5, "window_size": 3}}),
    "swin_bert_abs": ("swin", "bert", 48, True, 2, {"encoder": {"use_absolute_embeddings": True}}),  # + projection
}


def ved_config(encoder="vit", decoder="gpt2", dec_hidden=32, tied=True, type_vocab_size=2, extra=None):
    from transformers import BeitConfig, BertConfig, DeiTConfig, GPT2Config, VisionEncoderDecoderConfig, ViTConfig

    extra = dict(extra or {})
    if encoder in ("swin", "donut-swin"):  # 8x8 patches, window 4: stage 0 shifts, stage 1 is one 4x4 window; 16 -> 32 wide
        from transformers import DonutSwinConfig, SwinConfig

        enc = (SwinConfig if encoder == "swin" else DonutSwinConfig)(**{**dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                   window_size=4), **extra.pop("encoder", {})})
    else:
        enc_cls = {"vit": ViTConfig, "deit": DeiTConfig, "beit": BeitConfig}[encoder]
        enc = enc_cls(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=32, patch_size=8), **extra.pop("encoder", {})})
    common = dict(vocab_size=VOCAB, is_decoder=True, add_cross_attention=True, tie_word_embeddings=tied,
                  bos_token_id=START, eos_token_id=2, pad_token_id=PAD)
    if decoder == "gpt2":
        dec = GPT2Config(n_embd=dec_hidden, n_layer=2, n_head=4, n_positions=64, **common)
    elif decoder in DECODER_CONFIGS:
        dec = seq2seq_decoder_config(decoder, dec_hidden, common, **extra)
    else:
        dec = BertConfig(hidden_size=dec_hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64,
                         type_vocab_size=type_vocab_size, **common)
    return VisionEncoderDecoderConfig(encoder=enc.to_dict(), decoder=dec.to_dict(),
                                      decoder_start_token_id=START, pad_token_id=PAD)


def make_hf_ved(*shape, seed=0):
    """A transformers VisionEncoderDecoderModel with every parameter perturbed (so norms and
    biases matter too), in eval mode."""
    from transformers import VisionEncoderDecoderModel as HF

    torch.manual_seed(seed)
    model = HF(ved_config(*shape)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def images(batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def caption_labels(batch=2, seq=7, seed=0) -> np.ndarray:
    """Random token labels, the second row ending in -100 (a shorter caption)."""
    labels = np.random.default_rng(seed).integers(3, VOCAB, (batch, seq))
    labels[1, seq - 2:] = -100
    return labels


def torch_out(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in inputs.items()})


# decoder type -> (transformers config class name, how its sizes are spelled)
DECODER_CONFIGS = {"trocr": "TrOCRConfig", "bart": "BartConfig", "mbart": "MBartConfig", "roberta": "RobertaConfig"}


def seq2seq_decoder_config(decoder, hidden, common, **extra):
    """A TrOCR / BART / mBART / RoBERTa decoder config of the tiny sizes (RoBERTa with BERT's
    field names; its pad id is the VED pad, so positions start at 1)."""
    import transformers

    cls = getattr(transformers, DECODER_CONFIGS[decoder])
    if decoder == "roberta":
        return cls(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, type_vocab_size=1, **common, **extra)
    return cls(d_model=hidden, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
               max_position_embeddings=64, **common, **extra)


# Non-square images ([height, width] = [32, 48]): name -> make_hf_ved arguments
NON_SQUARE = {
    "vit_gpt2_wide": ("vit", "gpt2", 32, True, 2, {"encoder": {"image_size": [32, 48]}}),
    "beit_trocr_wide": ("beit", "trocr", 32, False, 2, {"encoder": {
        "image_size": [32, 48], "use_relative_position_bias": True}}),
    # Donut's shape: a wide Swin (8x12 patches, 4x6 after merging) and an mBART decoder
    "swin_mbart_wide": ("swin", "mbart", 32, True, 2, {"encoder": {"image_size": [32, 48]}}),
    "donut_mbart_wide": ("donut-swin", "mbart", 32, True, 2, {"encoder": {"image_size": [32, 48]}}),  # no final norm
}


def wide_images(batch=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 48)).astype(np.float32)


def save_warm_start_pair(tmp_path, encoder: str, decoder: str):
    """An encoder and a decoder checkpoint (every weight perturbed), as transformers saves them."""
    import transformers as tf

    torch.manual_seed(0)
    enc_kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    enc = {"vit_model": lambda: tf.ViTModel(tf.ViTConfig(**enc_kw)),
           "vit_classifier": lambda: tf.ViTForImageClassification(tf.ViTConfig(**enc_kw, num_labels=3))}[encoder]()
    dec_kw = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    dec = {
        "gpt2_lm": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=64, **dec_kw)),
        "bert_model": lambda: tf.BertModel(tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=64, **dec_kw)),
    }[decoder]()
    for model, name in ((enc, "enc"), (dec, "dec")):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(tmp_path / name)
    return tmp_path / "enc", tmp_path / "dec"

"""VisionEncoderDecoder in Flax NNX: a ViT / DeiT / BEiT / Swin encoder and a GPT-2 / BERT /
RoBERTa / TrOCR / BART / mBART decoder.

    from vipllava_jax.models.ved import VisionEncoderDecoderModel
    model = VisionEncoderDecoderModel.from_pretrained("converted/")   # or an HF folder
    out = model(pixel_values, labels=labels)                          # out.logits, out.loss
    captions = model.generate(pixel_values, num_beams=4, max_new_tokens=20)
    model = VisionEncoderDecoderModel.from_encoder_decoder_pretrained(encoder_dir, decoder_dir)

Files, in data-flow order: config.py (config.json), encoder.py (ViT/DeiT), beit.py, swin.py
(encoders), attention.py (self- and cross-attention with a static cache), gpt2.py / bert.py /
roberta.py / bart.py (decoders; bart.py also holds TrOCR's and mBART's), modeling.py (the
model, loss), generate.py (greedy, sampling, beam search), mapping.py (HF name table),
warm_start.py (a model from two pretrained checkpoints).
"""

from vipllava_jax.models.ved.config import DecoderConfig, VisionEncoderDecoderConfig, ViTConfig
from vipllava_jax.models.ved.modeling import VedOutput, VisionEncoderDecoderModel, seq2seq_loss, shift_tokens_right

__all__ = [
    "DecoderConfig", "VedOutput", "ViTConfig", "VisionEncoderDecoderConfig", "VisionEncoderDecoderModel",
    "seq2seq_loss", "shift_tokens_right",
]

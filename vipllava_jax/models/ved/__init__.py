"""VisionEncoderDecoder (ViT/DeiT encoder + GPT-2 / BERT / RoBERTa / TrOCR / BART / mBART decoder) in Flax NNX.

    from vipllava_jax.models.ved import VisionEncoderDecoderModel
    model = VisionEncoderDecoderModel.from_pretrained("converted/")   # or an HF folder
    out = model(pixel_values, labels=labels)                          # out.logits, out.loss
    captions = model.generate(pixel_values, num_beams=4, max_new_tokens=20)

Files, in data-flow order: config.py (config.json), encoder.py (ViT/DeiT), attention.py (self-
and cross-attention with a static cache), gpt2.py / bert.py / roberta.py / bart.py (decoders; bart.py
also holds TrOCR's and mBART's), modeling.py (the model, loss), generate.py (greedy, sampling, beam search), mapping.py (HF name table).
"""

from vipllava_jax.models.ved.config import DecoderConfig, VisionEncoderDecoderConfig, ViTConfig
from vipllava_jax.models.ved.modeling import VedOutput, VisionEncoderDecoderModel, seq2seq_loss, shift_tokens_right

__all__ = [
    "DecoderConfig", "VedOutput", "ViTConfig", "VisionEncoderDecoderConfig", "VisionEncoderDecoderModel",
    "seq2seq_loss", "shift_tokens_right",
]

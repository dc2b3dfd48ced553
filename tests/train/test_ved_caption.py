"""A tiny ViT + GPT-2 captioner learns to caption a synthetic set with the VED loss.

Images are solid colours at two brightnesses (plus noise); the caption of each is
"<dark|light> <colour> </s>". Eighty AdamW steps on `model(pixel_values, labels=labels).loss`
must make greedy `generate` write every caption exactly: the loss, its gradients, the
shift-right of the labels and the cached decode all have to agree for that to happen.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx

from vipllava_jax.models.ved import VisionEncoderDecoderConfig, VisionEncoderDecoderModel

PAD, START, EOS = 0, 1, 2
WORDS = {"dark": 3, "light": 4, "red": 5, "green": 6, "blue": 7, "yellow": 8}
COLOURS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0)}
BRIGHTNESS = {"dark": 0.4, "light": 1.0}


def tiny_config() -> VisionEncoderDecoderConfig:
    return VisionEncoderDecoderConfig.from_hf_dict({
        "model_type": "vision-encoder-decoder", "decoder_start_token_id": START, "pad_token_id": PAD,
        "encoder": {"model_type": "vit", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        "decoder": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "vocab_size": 16,
                    "n_positions": 8, "is_decoder": True, "add_cross_attention": True,
                    "bos_token_id": START, "eos_token_id": EOS, "pad_token_id": PAD},
    })


def synthetic_set(copies: int, seed: int):
    """(pixel_values [N, 3, 16, 16], labels [N, 3]) over every brightness x colour."""
    rng = np.random.default_rng(seed)
    pixels, labels = [], []
    for _ in range(copies):
        for shade, level in BRIGHTNESS.items():
            for colour, rgb in COLOURS.items():
                image = np.asarray(rgb, np.float32)[:, None, None] * level * 2 - 1  # in [-1, 1]
                pixels.append(image + rng.normal(0, 0.1, (3, 16, 16)).astype(np.float32))
                labels.append([WORDS[shade], WORDS[colour], EOS])
    return np.stack(pixels), np.asarray(labels, np.int32)


def test_tiny_captioner_learns_synthetic_captions():
    model = VisionEncoderDecoderModel.from_config(tiny_config(), seed=0)
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, pixels, labels):
        loss_fn = lambda p: nnx.merge(graphdef, p)(pixels, labels=labels).loss
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    pixels, labels = synthetic_set(copies=2, seed=0)
    first = None
    for _ in range(80):
        params, opt_state, loss = train_step(params, opt_state, pixels, labels)
        first = float(loss) if first is None else first
    assert float(loss) < 0.05 < first

    trained = nnx.merge(graphdef, params)
    test_pixels, test_labels = synthetic_set(copies=1, seed=1)  # fresh noise
    captions = trained.generate(test_pixels, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD)
    expected = np.concatenate([np.full((len(test_labels), 1), START), test_labels], axis=1)
    np.testing.assert_array_equal(captions, expected)

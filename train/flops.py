"""Model FLOPs of a train step (for MFU) and the peak TFLOP/s of known accelerators."""

from __future__ import annotations

import re

import jax

from vipllava_jax.registry import family_of_config
from vipllava_jax.train.step import TrainState

# Dense bf16 peak TFLOP/s per device, by a substring of `device.device_kind`.
PEAK_TFLOPS: dict[str, float] = {
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6": 918.0,
}


def device_peak_tflops(device) -> float | None:
    """The dense bf16 peak of `device` from `PEAK_TFLOPS`, or None (CPUs, unknown kinds)."""
    for kind, peak in PEAK_TFLOPS.items():
        if kind in device.device_kind:
            return peak
    return None


# Embedding and bias tables (VipLlava, CLIP, GPT-2, BERT, ViT, BART/TrOCR, BEiT/Swin names): lookups, not matmuls.
_LOOKUPS = ("embed_tokens", "position_embedding", "wte", "wpe", "word_embeddings", "token_type_embeddings",
            "cls_token", "distillation_token", "embed_positions", "relative_position_bias_table",
            "mask_token")


_WORD_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings")  # a tied head's weight
# A VED decoder's cross-attention keys and values (GPT-2, BERT, BART/mBART/TrOCR): they run on encoder tokens.
_CROSS_KV = re.compile(r"'crossattention'\]\['(c_attn|self'\]\['(key|value))'|'encoder_attn'\]\['(k_proj|v_proj)'")


def _is_lookup(path: str) -> bool:
    return any(f"'{name}" in path for name in _LOOKUPS)


def train_flops_per_token(state: TrainState, model_config, *, seq_len: int) -> float:
    """Model FLOPs of one training step per sequence position (PaLM's estimate, adapted): the
    matmuls an ideal implementation runs, the same for every kernel choice.

    Per weight matrix entry and per token it runs on, a matmul costs 2 FLOPs forward, 2 more
    for the input gradient and 2 for the weight gradient: 6 for a trained weight (4 where its
    input needs no gradient: the patch embedding, a projection straight off a frozen tower),
    4 for a frozen weight that gradients pass through (a frozen decoder), 2 for a frozen
    tower (forward only). The tower and the projector run on the image's tokens (the patch
    embedding on its patches; a VED decoder's cross-attention keys and values on the
    encoder's), the rest on every position; a tied output head is the word embedding's
    matmul. Attention adds 4 T S D per layer forward (x3 with its backward where trained),
    halved where causal: the decoder's is 6 L T D per position (PaLM counts 12, the full
    square), a VED decoder's cross-attention 12 L S D (S encoder tokens). Left out: embedding
    lookups, norms and biases (no matmuls). Every vision layer is counted, also any past the
    deepest feature layer, which does not run.
    """
    family = family_of_config(model_config)
    side = family.image_side(model_config)
    image_side, patches, vision, reads_tower = side.parts, side.patches, side.vision, side.reads_tower
    tower = next(iter(image_side))
    tower_trained = tower in state.params
    text = family.text_config(model_config)
    layers, width = text.num_hidden_layers, text.hidden_size
    per_row = 6 * layers * seq_len**2 * width  # causal self-attention, forward and backward
    per_row += 12 * layers * seq_len * side.cross_tokens * width  # a decoder's cross-attention
    tokens = image_side[tower]  # the tower's own attention, not causal
    per_row += (3 if tower_trained else 1) * 4 * vision.num_hidden_layers * tokens**2 * vision.hidden_size

    def flops_per_use(trained: bool, part: str, key: str) -> int:
        if not trained:
            return 2 if part in image_side else 4
        no_input_grad = "patch_embedding" in key or (part == reads_tower and not tower_trained)
        return 4 if no_input_grad else 6

    for trained, tree in ((True, state.params), (False, state.frozen)):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            key, part = jax.tree_util.keystr(path), str(path[0].key)
            if text.tie_word_embeddings and any(f"'{name}'" in key for name in _WORD_EMBEDDINGS):
                per_row += (6 if trained else 4) * x.size * seq_len  # the tied output head
            if x.ndim < 2 or _is_lookup(key) or "'pooler'" in key:  # ViT's pooler never runs
                continue
            if "patch_embedding" in key:
                tokens = patches
            elif _CROSS_KV.search(key):
                tokens = side.cross_tokens
            else:
                tokens = image_side.get(part, seq_len)
            per_row += flops_per_use(trained, part, key) * x.size * tokens
    return per_row / seq_len

"""Helpers of the conversion tests: the side files a source carries, running the command,
our logits from a converted folder."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from flax import nnx

from vipllava_jax.convert.cli import main
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration

SIDE_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 4096, "padding_side": "left"}),
    "special_tokens_map.json": json.dumps({"bos_token": "<s>", "pad_token": "<pad>"}),
    "preprocessor_config.json": json.dumps({"crop_size": {"height": 28, "width": 28}}),
}
ATOL = 1e-4


@nnx.jit
def _logits(model, input_ids, pixel_values, attention_mask):
    return model(input_ids, pixel_values, attention_mask).logits


def jax_logits(folder, inputs, **kw) -> np.ndarray:
    model = VipLlavaForConditionalGeneration.from_pretrained(folder, **kw)
    return np.asarray(_logits(model, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]))


def max_err(ours: np.ndarray, ref: np.ndarray, inputs) -> float:
    """Largest difference over the non-padding positions."""
    keep = inputs["attention_mask"].astype(bool)
    return float(np.abs(ours.astype(np.float32) - ref)[keep].max())


def add_side_files(folder: Path) -> Path:
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text)
    return folder


def convert(*args) -> int:
    return main([str(a) for a in args])


def safetensors_header(file: Path) -> dict:
    """The tensor entries of a safetensors file's JSON header."""
    data = file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    return header

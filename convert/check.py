"""`vipllava-convert ... --check`: the source run by transformers' PyTorch model and the converted
folder run by ours, on the same random input: max |Δlogits| and whether greedy tokens agree.

It holds two models at once, the PyTorch reference (float32) and ours (in the converted
folder's dtype, computing in float32): about 2 x the float32 model size of RAM, read one
tensor at a time as every load here is. The reference of each model_type is in `REFERENCES`
(the original layout's is transformers' VipLlava with the original weights renamed as
transformers' conversion script renames them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vipllava_jax import hub, storage
from vipllava_jax.errors import CheckpointError
from vipllava_jax.registry import family_of

# max |Δlogits| allowed for weights stored in each dtype (ours computes in float32; the
# reference in float32 from the source's weights)
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
NEW_TOKENS = 8


@dataclasses.dataclass(frozen=True)
class CheckResult:
    max_abs_diff: float
    tolerance: float
    tokens_agree: bool

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.tokens_agree

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"check {verdict}: max |Δlogits| {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}), "
                f"greedy tokens {'agree' if self.tokens_agree else 'differ'}")


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("--check runs transformers' PyTorch model: install torch") from None
    return torch


def _hf_vipllava(src: Path, ours):
    from transformers import VipLlavaForConditionalGeneration

    return VipLlavaForConditionalGeneration.from_pretrained(src, dtype=_torch().float32), None


def _hf_ved(src: Path, ours):
    from transformers import VisionEncoderDecoderModel

    return VisionEncoderDecoderModel.from_pretrained(src, dtype=_torch().float32), None


def _hf_original(src: Path, ours):
    """transformers' VipLlava holding the original weights under transformers' names; the rows
    the conversion added (drawn, not from the source) are copied from `ours`."""
    import transformers

    from vipllava_jax.checkpoint.hf import open_hf_weights
    from vipllava_jax.models.vipllava.original import config_from_original, original_key

    torch = _torch()
    config = config_from_original(src)
    hf_dict = config.to_hf_dict()
    hf_config = transformers.VipLlavaConfig(
        vision_config=hf_dict["vision_config"], text_config=hf_dict["text_config"],
        image_token_index=hf_dict["image_token_index"], vision_feature_layer=hf_dict["vision_feature_layer"])
    model = transformers.VipLlavaForConditionalGeneration(hf_config).eval()
    ours_to_torch = {
        "language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
        "vision_tower.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector.",
    }
    target = model.state_dict()
    with torch.no_grad():
        for key, (_, read) in open_hf_weights(src).items():
            canon = original_key(key)
            for a, b in ours_to_torch.items():
                if canon.startswith(a):
                    name = b + canon[len(a):]
                    break
            else:
                continue
            if name in target:
                value = torch.from_numpy(np.asarray(read(), np.float32))
                target[name][: value.shape[0]].copy_(value)
        v0 = config.image_token_index
        grown = np.array(ours.language_model.embed_tokens.embedding[...], np.float32)[v0:]
        target["model.language_model.embed_tokens.weight"][v0:].copy_(torch.from_numpy(grown))
        head = np.asarray(ours.lm_head.kernel[...], np.float32).T[v0:]  # kernel [D, V]
        target["lm_head.weight"][v0:].copy_(torch.from_numpy(np.ascontiguousarray(head)))
    return model, None


REFERENCES: dict[str, Callable[[Path, Any], tuple[Any, int | None]]] = {
    "vipllava": _hf_vipllava,
    "vision-encoder-decoder": _hf_ved,
    "llava_llama": _hf_original,
}


def _conversation_inputs(config, rng) -> dict[str, np.ndarray]:
    vision = config.vision_config
    text_vocab = min(config.text_config.vocab_size, config.image_token_index)
    n = config.num_image_tokens
    ids = rng.integers(3, text_vocab, (2, n + 8))
    ids[:, 1:1 + n] = config.image_token_index
    pixels = rng.standard_normal((2, vision.num_channels, vision.image_size, vision.image_size))
    return {"input_ids": ids, "pixel_values": pixels.astype(np.float32)}


def _caption_inputs(config, rng) -> dict[str, np.ndarray]:
    enc = config.encoder
    pixels = rng.standard_normal((2, enc.num_channels, *enc.image_hw)).astype(np.float32)
    ids = rng.integers(3, config.decoder.vocab_size, (2, 6))
    return {"pixel_values": pixels, "decoder_input_ids": ids}


def check_conversion(src: str | Path, dst: str | Path, *, seed: int = 0) -> CheckResult:
    """Runs the source with transformers and `dst` with ours on the same random input."""
    with storage.local_copy(hub.resolve(src)) as local:  # transformers reads local folders
        return _check(local, storage.path(dst), seed)


def _check(src: Path, dst, seed: int) -> CheckResult:
    torch = _torch()
    family = family_of(src)
    if family.model_type not in REFERENCES:
        raise CheckpointError(f"--check has no transformers reference for model_type {family.model_type!r}")
    converted = family_of(dst)
    config = converted.config_class.from_pretrained(dst)
    ours = converted.model_class.from_pretrained(dst, dtype="float32")
    reference, columns = REFERENCES[family.model_type](src, ours)
    reference.eval()
    rng = np.random.default_rng(seed)
    captions = converted.data == "captions"
    inputs = (_caption_inputs if captions else _conversation_inputs)(config, rng)
    with torch.no_grad():
        want = reference(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.float().numpy()
    got = np.asarray(ours(**inputs).logits, np.float32)
    if columns is not None:
        want, got = want[..., :columns], got[..., :columns]
    diff = float(np.abs(got - want).max())
    with torch.no_grad():
        if captions:
            start = config.decoder_start_token_id if config.decoder_start_token_id is not None else 0
            ref_tokens = reference.generate(torch.tensor(inputs["pixel_values"]), max_new_tokens=NEW_TOKENS,
                                            do_sample=False, decoder_start_token_id=start, pad_token_id=0,
                                            eos_token_id=None, min_new_tokens=NEW_TOKENS).numpy()
            our_tokens = ours.generate(inputs["pixel_values"], max_new_tokens=NEW_TOKENS, eos_token_id=[],
                                       decoder_start_token_id=start, pad_token_id=0)
        else:
            ref_tokens = reference.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, do_sample=False,
                                            max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None,
                                            min_new_tokens=NEW_TOKENS).numpy()
            our_tokens = ours.generate(**inputs, max_new_tokens=NEW_TOKENS, eos_token_id=[], pad_token_id=0)
    agree = ref_tokens.shape == np.shape(our_tokens) and bool(np.all(ref_tokens == np.asarray(our_tokens)))
    return CheckResult(diff, TOLERANCE.get(str(config.dtype), TOLERANCE["bfloat16"]), agree)

"""`vipllava-demo`: the whole pipeline on an embedded tiny model, no downloads.

Builds a tiny random VipLlava, saves it as an HF checkpoint folder, converts it to Orbax
(`vipllava-convert hf-to-orbax`), restores it, runs a forward pass on a random image and
prompt and prints the result. With torch installed it also loads the HF folder in
transformers and prints the largest logit difference.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from vipllava_jax.checkpoint import hf_to_orbax, model_params
from vipllava_jax.checkpoint.hf import write_hf_params
from vipllava_jax.config import CLIPVisionConfig, TextConfig, VipLlavaConfig
from vipllava_jax.modeling import VipLlavaForConditionalGeneration

TINY = VipLlavaConfig(
    vision_config=CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        image_size=56, patch_size=14, projection_dim=32,
    ),
    text_config=TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    ),
    image_token_index=255,
    vision_feature_layer=(-2, -3, 1),
)


def run(workdir: Path, seed: int = 0) -> dict:
    hf_dir, orbax_dir = workdir / "tiny-hf", workdir / "tiny-orbax"
    hf_dir.mkdir()
    random_model = VipLlavaForConditionalGeneration.from_config(TINY, seed=seed)
    write_hf_params(model_params(random_model), hf_dir)
    TINY.save_pretrained(hf_dir)
    hf_to_orbax(hf_dir, orbax_dir)
    model = VipLlavaForConditionalGeneration.from_pretrained(orbax_dir)

    rng = np.random.default_rng(seed)
    n = TINY.num_image_tokens
    ids = np.concatenate([[1], np.full(n, TINY.image_token_index), rng.integers(3, 250, 8)])[None]
    pixels = rng.standard_normal((1, 3, 56, 56)).astype(np.float32)
    logits = np.asarray(model(input_ids=ids, pixel_values=pixels).logits)
    result = {"hf_dir": hf_dir, "orbax_dir": orbax_dir, "logits": logits, "ids": ids, "pixels": pixels}
    try:
        import torch
        import transformers
    except ImportError:
        return result
    ref = transformers.VipLlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    result["max_abs_diff"] = float(np.abs(logits - ref_logits).max())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vipllava-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        r = run(Path(tmp), args.seed)
        logits = r["logits"]
        print(f"tiny VipLlava: HF folder -> Orbax -> JAX forward, {TINY.num_image_tokens} image tokens")
        print(f"input_ids {r['ids'].shape}, pixel_values {r['pixels'].shape} -> logits {logits.shape}")
        print(f"next-token argmax at the last 5 positions: {logits[0, -5:].argmax(-1).tolist()}")
        if "max_abs_diff" in r:
            print(f"max |logits - transformers' PyTorch logits| = {r['max_abs_diff']:.2e}")
        else:
            print("(install torch to compare against transformers' PyTorch model)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Captioning throughput: our VED beam search against transformers' PyTorch, same model, same CPU.

    python -m benchmarks.caption                 # ViT-base/16 (224 px) + GPT-2 small, fp32
    python -m benchmarks.caption --tiny          # a tiny model, to check the script runs

transformers builds the random model and saves it; ours loads that folder (the converter's HF
reader), so both run identical weights. EOS is an id outside the vocabulary, so every caption
is exactly --new-tokens long on both sides (checked). Printed: images/s of each, the ratio, and
the JAX compile time (first call minus a steady-state call). Both run in this process one after
the other; on a shared machine the numbers are noisy.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import torch


def hf_model(tiny: bool):
    from transformers import GPT2Config, VisionEncoderDecoderConfig, ViTConfig
    from transformers import VisionEncoderDecoderModel as HF

    if tiny:
        enc = ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)
        dec = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=64, bos_token_id=1,
                         eos_token_id=2)
    else:  # google/vit-base-patch16-224 + gpt2 shapes (the nlpconnect captioner's)
        enc, dec = ViTConfig(), GPT2Config()
    dec.is_decoder, dec.add_cross_attention = True, True
    config = VisionEncoderDecoderConfig(encoder=enc.to_dict(), decoder=dec.to_dict(),
                                        decoder_start_token_id=dec.bos_token_id, pad_token_id=dec.eos_token_id)
    torch.manual_seed(0)
    return HF(config).eval()


def timed(fn, reps: int) -> tuple[float, float, object]:
    """(first call seconds, mean of the next `reps` calls, last output)."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return first, (time.perf_counter() - t) / reps, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()

    from vipllava_jax.models.ved import VisionEncoderDecoderModel

    hf = hf_model(args.tiny)
    cfg = hf.config
    size = cfg.encoder.image_size
    px = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    kw = dict(max_new_tokens=args.new_tokens, num_beams=args.beams, eos_token_id=cfg.decoder.vocab_size,
              pad_token_id=cfg.pad_token_id, decoder_start_token_id=cfg.decoder_start_token_id)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = VisionEncoderDecoderModel.from_pretrained(folder)

    def run_torch():
        with torch.no_grad():
            return hf.generate(torch.tensor(px), do_sample=False, **kw).numpy()

    def run_jax():
        return ours.generate(px, **kw)

    j_first, j_time, j_out = timed(run_jax, args.reps)
    t_first, t_time, t_out = timed(run_torch, args.reps)
    want = (args.batch, 1 + args.new_tokens)
    assert j_out.shape == t_out.shape == want, (j_out.shape, t_out.shape)
    same = float(np.mean(j_out == t_out))

    n_params = sum(p.numel() for p in hf.parameters())
    print(f"model: ViT {cfg.encoder.hidden_size}x{cfg.encoder.num_hidden_layers} @ {size}px + "
          f"GPT-2 {cfg.decoder.n_embd}x{cfg.decoder.n_layer} ({n_params / 1e6:.1f}M params), fp32, "
          f"batch {args.batch}, beams {args.beams}, {args.new_tokens} new tokens, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs")
    print(f"{'':24}{'s/batch':>10}{'images/s':>10}")
    print(f"{'transformers (PyTorch)':24}{t_time:>10.2f}{args.batch / t_time:>10.2f}")
    print(f"{'vipllava_jax (JAX)':24}{j_time:>10.2f}{args.batch / j_time:>10.2f}")
    print(f"JAX / PyTorch throughput: {t_time / j_time:.2f}x")
    print(f"JAX compile (first call - steady call): {j_first - j_time:.1f} s; PyTorch first call {t_first:.2f} s")
    print(f"tokens equal to transformers': {same:.1%}")


if __name__ == "__main__":
    main()

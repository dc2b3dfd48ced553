"""Captioning throughput: our VED beam search against transformers' PyTorch, same model, same CPU.

    python -m benchmarks.caption                       # ViT-base/16 (224 px) + GPT-2 small, fp32
    python -m benchmarks.caption --model trocr-base    # TrOCR-base's shapes: BEiT-base 384 px + TrOCR (1024 wide)
    python -m benchmarks.caption --model donut-base    # Donut-base's shapes: donut-swin + mBART, at --donut-hw
    python -m benchmarks.caption --tiny                # a tiny model, to check the script runs

transformers builds the random model (its own configs of those shapes) and saves it; ours
loads that folder (the converter's HF reader), so both run identical weights. EOS is an id
outside the vocabulary and no BOS/EOS is forced, so every caption is exactly --new-tokens long
on both sides (checked). Printed: images/s of each, the ratio, and the JAX compile time (first
call minus a steady-state call). Both run in this process one after the other; on a shared
machine the numbers are noisy. Donut-base reads 2560 x 1920 pages; --donut-hw shrinks them
(the encoder's cost scales with the pixel count) so a CPU run ends in minutes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import torch

NO_FORCED = dict(forced_bos_token_id=None, forced_eos_token_id=None)


def vit_gpt2(tiny: bool):
    from transformers import GPT2Config, ViTConfig

    if tiny:
        enc = ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        image_size=32, patch_size=8)
        dec = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, n_positions=64, bos_token_id=1,
                         eos_token_id=2)
    else:  # google/vit-base-patch16-224 + gpt2 shapes (the nlpconnect captioner's)
        enc, dec = ViTConfig(), GPT2Config()
    return enc, dec, dec.bos_token_id, dec.eos_token_id


def trocr_base():
    """microsoft/trocr-base-*: BEiT-base/16 at 384 px, TrOCR decoder 1024 x 12 reading the 768-wide encoder."""
    from transformers import BeitConfig, TrOCRConfig

    enc = BeitConfig(image_size=384, use_relative_position_bias=True, use_mean_pooling=False,
                     layer_scale_init_value=0.1, use_absolute_position_embeddings=False)
    dec = TrOCRConfig(vocab_size=50265, d_model=1024, decoder_layers=12, decoder_attention_heads=16,
                      decoder_ffn_dim=4096, activation_function="gelu", max_position_embeddings=512,
                      cross_attention_hidden_size=768, scale_embedding=False, layernorm_embedding=True,
                      use_learned_position_embeddings=True, tie_word_embeddings=False,
                      bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    return enc, dec, 2, 1


def donut_base(hw: tuple[int, int]):
    """naver-clova-ix/donut-base: donut-swin (128 wide, depths 2-2-14-2, window 10) + mBART decoder 1024 x 4."""
    from transformers import DonutSwinConfig, MBartConfig

    enc = DonutSwinConfig(image_size=list(hw), patch_size=4, embed_dim=128, depths=[2, 2, 14, 2],
                          num_heads=[4, 8, 16, 32], window_size=10)
    dec = MBartConfig(vocab_size=57525, d_model=1024, decoder_layers=4, decoder_attention_heads=16,
                      decoder_ffn_dim=4096, max_position_embeddings=1536, scale_embedding=True,
                      add_final_layer_norm=True, bos_token_id=0, pad_token_id=1, eos_token_id=2, **NO_FORCED)
    return enc, dec, 0, 1


def hf_model(name: str, tiny: bool, donut_hw: tuple[int, int]):
    from transformers import VisionEncoderDecoderConfig
    from transformers import VisionEncoderDecoderModel as HF

    enc, dec, start, pad = {"vit-gpt2": lambda: vit_gpt2(tiny), "trocr-base": trocr_base,
                            "donut-base": lambda: donut_base(donut_hw)}[name]()
    dec.is_decoder, dec.add_cross_attention = True, True
    config = VisionEncoderDecoderConfig(encoder=enc.to_dict(), decoder=dec.to_dict(),
                                        decoder_start_token_id=start, pad_token_id=pad, **NO_FORCED)
    torch.manual_seed(0)
    return HF(config).eval()


def describe(cfg) -> str:
    enc, dec = cfg.encoder, cfg.decoder
    size = enc.image_size if isinstance(enc.image_size, int) else "x".join(map(str, enc.image_size))
    depth = sum(enc.depths) if hasattr(enc, "depths") else enc.num_hidden_layers  # Swin: blocks over all stages
    width = getattr(dec, "d_model", None) or getattr(dec, "n_embd", None)
    layers = getattr(dec, "decoder_layers", None) or getattr(dec, "n_layer", None)
    return f"{enc.model_type} {enc.hidden_size}x{depth} @ {size}px + {dec.model_type} {width}x{layers}"


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
    parser.add_argument("--model", choices=["vit-gpt2", "trocr-base", "donut-base"], default="vit-gpt2")
    parser.add_argument("--donut-hw", type=int, nargs=2, default=[640, 480], metavar=("H", "W"),
                        help="donut-base's image height and width (the checkpoint's: 2560 1920)")
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT + GPT-2 (with --model vit-gpt2)")
    args = parser.parse_args()

    from vipllava_jax.models.ved import VisionEncoderDecoderModel

    hf = hf_model(args.model, args.tiny, tuple(args.donut_hw))
    cfg = hf.config
    size = cfg.encoder.image_size
    h, w = (size, size) if isinstance(size, int) else size
    px = np.random.default_rng(0).standard_normal((args.batch, 3, h, w)).astype(np.float32)
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
    print(f"model: {args.model}: {describe(cfg)} ({n_params / 1e6:.1f}M params), fp32, "
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

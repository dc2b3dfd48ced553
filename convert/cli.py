"""`vipllava-convert`: HF VipLlava or vision-encoder-decoder folder <-> Orbax folder.

The folder's config.json model_type picks the model; the logic is in conversions.py.
"""

from __future__ import annotations

import argparse
import sys

from vipllava_jax.errors import VipLlavaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vipllava-convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF checkpoint folder -> Orbax folder")
    a.add_argument("src", help="an HF model folder (config.json + safetensors or .bin weights)")
    a.add_argument("dst", help="the Orbax folder to write (written whole or not at all)")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="parameter dtype to store (default: the checkpoint's own)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    a.add_argument("--projector", metavar="FILE",
                   help="a weight file whose tensors replace SRC's of the same name: the original "
                        "ViP-LLaVA's stage-1 mm_projector.bin applied onto its base model")
    a.add_argument("--check", action="store_true",
                   help="then run SRC with transformers (PyTorch) and DST with vipllava-jax on one random "
                        "input: print max |logit difference| and greedy agreement; exit 1 past the dtype's tolerance")
    b = sub.add_parser("orbax-to-hf", help="Orbax folder -> HF safetensors folder")
    b.add_argument("src", help="an Orbax folder from hf-to-orbax, or a training run's output folder")
    b.add_argument("dst", help="the HF folder to write (safetensors + config + tokenizer files)")
    b.add_argument("--max-shard-size", type=float, default=5.0, help="GiB per safetensors shard")
    b.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    b.add_argument("--check", action="store_true",
                   help="then run DST with transformers (PyTorch) and SRC with vipllava-jax on one random "
                        "input: print max |logit difference| and greedy agreement; exit 1 past the dtype's tolerance")
    args = parser.parse_args(argv)

    from vipllava_jax.convert import conversions  # after argument parsing: --help stays fast

    try:
        if args.command == "hf-to-orbax":
            out = conversions.hf_to_orbax(args.src, args.dst, dtype=args.dtype,
                                         overwrite=args.overwrite, progress=True, projector=args.projector)
        else:
            out = conversions.orbax_to_hf(args.src, args.dst, overwrite=args.overwrite,
                                         max_shard_bytes=int(args.max_shard_size * 2**30),
                                         progress=True)
        print(f"wrote {out}")
        if args.check:
            from vipllava_jax.convert.check import check_conversion

            hf_side, ours = (args.src, out) if args.command == "hf-to-orbax" else (out, args.src)
            result = check_conversion(hf_side, ours)
            print(result)
            return 0 if result.ok else 1
    except KeyboardInterrupt:
        print("vipllava-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (VipLlavaError, OSError) as e:  # OSError: unreadable SRC, unwritable DST, disk full
        print(f"vipllava-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`vipllava-eval`: answer a LLaVA-format question set and score it (logic: vipllava_jax.evaluation.evaluate)."""

from __future__ import annotations

import argparse
import sys

from vipllava_jax.errors import VipLlavaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vipllava-eval", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Orbax folder from vipllava-convert (or an HF folder)")
    p.add_argument("--data", required=True, help="LLaVA-format JSON or JSONL (first human/gpt turn)")
    p.add_argument("--image-folder", help="where the records' images are (default: the data file's folder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--template", default="vipllava", choices=["vipllava", "llava_v1"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--limit", type=int, help="only the first N records")
    p.add_argument("--out", help="write the predictions here as JSONL")
    args = p.parse_args(argv)

    from vipllava_jax.evaluation.evaluate import evaluate, format_table

    try:
        summary, _ = evaluate(
            args.model, args.data, image_folder=args.image_folder, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, template=args.template, dtype=args.dtype,
            limit=args.limit, out=args.out,
        )
    except (VipLlavaError, OSError) as e:
        print(f"vipllava-eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(summary))
    if args.out:
        print(f"predictions -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

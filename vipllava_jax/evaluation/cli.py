"""`vipllava-eval`: answer a question set and score it (logic: vipllava_jax.evaluation.evaluate).

Without --model and --data it scores the embedded tiny model on its held-out test split, with
the images beside it. The format is told from the first record: LLaVA conversations; ViP-Bench's
questions.jsonl (answers written for its grader with --out, not scored here); ViP-LLaVA-Instruct
v7w / pointQA_twice region records (marked on the fly, scored by letter or exact match).
jax loads only after the arguments parse, so --help is fast."""

from __future__ import annotations

import argparse
import sys

from vipllava_jax.errors import VipLlavaError


def main(argv: list[str] | None = None) -> int:
    from vipllava_jax.embedded import EMBEDDED_MODEL, EMBEDDED_TEST_SPLIT

    p = argparse.ArgumentParser(prog="vipllava-eval", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[1])
    p.add_argument("--model", default=str(EMBEDDED_MODEL),
                   help="Orbax folder from vipllava-convert, or an HF folder with its tokenizer "
                   "(default: the embedded tiny model, %(default)s)")
    p.add_argument("--data", default=str(EMBEDDED_TEST_SPLIT),
                   help="JSON or JSONL question set: LLaVA conversations, ViP-Bench questions "
                   "(question_id, image, text) or v7w / pointQA_twice region records "
                   "(default: the embedded model's test split, %(default)s)")
    p.add_argument("--image-folder", help="where the records' images are, a folder or gs:// URL "
                   "(default: the data file's folder)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="questions answered together (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="the longest answer, in tokens; answers also stop at the template's turn "
                   "end (default: %(default)s)")
    p.add_argument("--template", default="vipllava", choices=["llava_v1", "vipllava"],
                   help="chat format: vipllava (the HF model card's, '###' ends a turn) or llava_v1 "
                   "(the original repository's, '</s>' ends a turn) (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the model (default: %(default)s; bfloat16 halves memory)")
    p.add_argument("--limit", type=int, help="only the first N records (N >= 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="markers of region records: record i is drawn with seed (seed, i) "
                   "(default: %(default)s)")
    p.add_argument("--out", help="write the predictions here as JSONL (a file or a gs:// object, "
                   "checked before any answer; written whole at the end)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        return _fail(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        return _fail(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        return _fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.seed < 0:
        return _fail(f"--seed must be >= 0, got {args.seed}")
    from vipllava_jax.evaluation.evaluate import evaluate, format_table

    try:
        summary, rows = evaluate(
            args.model, args.data, image_folder=args.image_folder, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, template=args.template, dtype=args.dtype,
            limit=args.limit, out=args.out, progress=not args.no_progress, seed=args.seed,
        )
    except (VipLlavaError, OSError) as e:
        print(f"vipllava-eval: error: {e}", file=sys.stderr)
        return 2
    if summary is None:
        print(f"answered {len(rows)} ViP-Bench questions (scored by ViP-Bench's grader)"
              + ("" if args.out else "; give --out to keep the answers"))
    else:
        print(format_table(summary))
    if args.out:
        print(f"predictions -> {args.out}")
    return 0


def _fail(message: str) -> int:
    print(f"vipllava-eval: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""`vipllava-generate`: answer a question about an image. Logic lives in the library."""

from __future__ import annotations

import argparse
import sys

from vipllava_jax.errors import VipLlavaError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vipllava-generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Orbax folder from vipllava-convert (or an HF folder)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="the question, e.g. 'What is in the red box?'")
    p.add_argument("--template", default="vipllava", choices=["vipllava", "llava_v1"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    args = p.parse_args(argv)

    from vipllava_jax.modeling import VipLlavaForConditionalGeneration
    from vipllava_jax.processor import VipLlavaProcessor
    from vipllava_jax.prompts import build_prompt

    try:
        processor = VipLlavaProcessor.from_pretrained(args.model)
        model = VipLlavaForConditionalGeneration.from_pretrained(args.model, dtype=args.dtype)
        inputs = processor(text=build_prompt(args.prompt, template=args.template), images=[args.image])
        kwargs = dict(
            max_new_tokens=args.max_new_tokens, do_sample=args.temperature is not None,
            temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, eos_token_id=processor.tokenizer.eos_token_id,
            pad_token_id=processor.pad_token_id,
        )
        if args.stream:
            new, shown = [], ""
            for piece in model.generate_stream(**inputs, **kwargs):
                new.extend(piece[0].tolist())
                text = processor.decode(new)
                print(text[len(shown):], end="", flush=True)
                shown = text
            print()
        else:
            out = model.generate(**inputs, **kwargs)
            print(processor.decode(out[0, inputs["input_ids"].shape[1]:]))
    except (VipLlavaError, FileNotFoundError) as e:
        print(f"vipllava-generate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

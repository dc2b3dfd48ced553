"""`vipllava-generate`: answer a question about an image. Logic lives in the library."""

from __future__ import annotations

import argparse
import sys
import warnings

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
    g = p.add_argument_group("visual prompt (draw a marker on the image before asking)")
    g.add_argument("--marker", help="rectangle, ellipse, triangle, point, scribble, mask_contour, mask or arrow")
    g.add_argument("--box", help="the region as x0,y0,x1,y1 in pixels")
    g.add_argument("--point", help="the region as x,y in pixels (instead of --box)")
    g.add_argument("--color", help="(default red) red, lime, blue, yellow, fuchsia, aqua, orange, purple, gold, or r,g,b")
    g.add_argument("--marker-style", default="constant", help="constant (evaluation look, default) or random (training ranges, seeded by --seed)")
    g.add_argument("--save-marked", metavar="PATH", help="write the marked image here (PNG)")
    g.add_argument("--pad-to-square", action="store_true", help="pad the image to a square first, as the original ViP-LLaVA does, so no marker is cropped")
    args = p.parse_args(argv)

    from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration
    from vipllava_jax.processing.processor import VipLlavaProcessor
    from vipllava_jax.processing.prompts import build_prompt

    try:
        vp = _visual_prompt(args)
        if vp is not None:
            from vipllava_jax.processing.visual_prompts import draw_visual_prompt

            marked = draw_visual_prompt(args.image, vp)  # checks the region before the model loads
            if args.save_marked:
                marked.save(args.save_marked, format="PNG")
        processor = VipLlavaProcessor.from_pretrained(args.model, pad_to_square=args.pad_to_square)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inputs = processor(
                text=build_prompt(args.prompt, template=args.template), images=[args.image],
                visual_prompts=None if vp is None else [vp],
            )
        for w in caught:
            print(f"vipllava-generate: warning: {w.message}", file=sys.stderr)
        model = VipLlavaForConditionalGeneration.from_pretrained(args.model, dtype=args.dtype)
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
    except (VipLlavaError, OSError) as e:  # OSError: unreadable image, unwritable --save-marked
        print(f"vipllava-generate: error: {e}", file=sys.stderr)
        return 2
    return 0


def _visual_prompt(args: argparse.Namespace):
    """The `VisualPrompt` the marker flags ask for, or None without --marker.

    Raises:
        VipLlavaError: flags that do not go together or do not parse.
    """
    from vipllava_jax.processing.visual_prompts import VisualPrompt

    if args.marker is None:
        stray = [f for f, v in (("--box", args.box), ("--point", args.point),
                                ("--color", args.color), ("--save-marked", args.save_marked))
                 if v is not None]
        if stray:
            raise VipLlavaError(f"{stray[0]} needs --marker")
        return None
    if (args.box is None) == (args.point is None):
        raise VipLlavaError("--marker needs exactly one of --box x0,y0,x1,y1 or --point x,y")
    box = _numbers("--box", args.box, 4) if args.box is not None else None
    point = _numbers("--point", args.point, 2) if args.point is not None else None
    color = args.color or "red"
    if "," in color:
        color = _numbers("--color", color, 3)
        if not all(c.is_integer() for c in color):
            raise VipLlavaError(f"--color r,g,b takes integers 0-255, got {args.color!r}")
        color = tuple(int(c) for c in color)
    return VisualPrompt(marker=args.marker, box=box, point=point, color=color,
                        style=args.marker_style, seed=args.seed)


def _numbers(flag: str, text: str, n: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise VipLlavaError(f"{flag} takes {n} comma-separated numbers, got {text!r}")
    return values


if __name__ == "__main__":
    sys.exit(main())

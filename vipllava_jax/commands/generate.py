"""`vipllava-generate`: answer a question about an image (default model: the embedded tiny one).
Logic lives in the library; jax loads only after the arguments parse, so --help is fast."""

from __future__ import annotations

import argparse
import math
import sys
import warnings

from vipllava_jax.errors import VipLlavaError

TEMPLATE_NAMES = ("llava_v1", "vipllava")  # processing.prompts.TEMPLATES (not imported for --help)


def main(argv: list[str] | None = None) -> int:
    from vipllava_jax.embedded import EMBEDDED_MODEL  # no jax: --help stays fast

    p = argparse.ArgumentParser(prog="vipllava-generate", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(EMBEDDED_MODEL),
                   help="Orbax folder from vipllava-convert, or an HF folder with its tokenizer "
                   "(default: the embedded tiny model, %(default)s)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--question", "--prompt", dest="prompt", required=True,
                   help="the question about the image, e.g. 'What is in the red box?' (the chat "
                   "template and the <image> placeholder are added)")
    p.add_argument("--template", default="vipllava", choices=sorted(TEMPLATE_NAMES),
                   help="chat format: vipllava (the HF model card's, '###' ends a turn) or llava_v1 "
                   "(the original repository's, '</s>' ends a turn); the answer stops at that end "
                   "(default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="the longest answer, in tokens (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sample at this temperature; 0 or unset: greedy (the likeliest token)")
    p.add_argument("--top-k", type=int, default=0,
                   help="when sampling, keep only the k likeliest tokens (0 = all, default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="when sampling, keep the likeliest tokens holding this much probability, in "
                   "(0, 1] (1 = all, default)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of sampling and of --marker-style random (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the model (default: %(default)s; bfloat16 halves memory)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    g = p.add_argument_group("visual prompt (draw a marker on the image before asking)")
    g.add_argument("--marker", help="rectangle, ellipse, triangle, point, scribble, mask_contour, mask or arrow")
    g.add_argument("--box", help="the region as x0,y0,x1,y1 in pixels of the upright image (as viewers show it)")
    g.add_argument("--point", help="the region as x,y in pixels (instead of --box)")
    g.add_argument("--seg", action="append", metavar="X,Y,X,Y,...",
                   help="the region as a COCO polygon in pixels, 3 points or more (instead of --box); "
                   "repeat it for a region in several parts")
    g.add_argument("--alpha", type=int, help="marker opacity 0-255 (default: the style's, constant 128)")
    g.add_argument("--width", type=int, help="line width in pixels of outline markers (default: the style's, 3 s for "
                   "a rectangle, s = the longer image side / 336)")
    g.add_argument("--color", help="(default red) red, lime, blue, yellow, fuchsia, aqua, orange, purple, gold, or r,g,b")
    g.add_argument("--marker-style", default="constant", help="constant (evaluation look, default) or random (training ranges, seeded by --seed)")
    g.add_argument("--save-marked", metavar="PATH", help="write the marked image here (PNG)")
    g.add_argument("--pad-to-square", action="store_true", help="pad the image to a square first, as the original ViP-LLaVA does, so no marker is cropped")
    args = p.parse_args(argv)
    if args.temperature is not None and not 0 <= args.temperature < math.inf:
        return _fail(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        return _fail(f"--top-k must be >= 0 (0 = all tokens), got {args.top_k}")
    if not 0 < args.top_p <= 1:
        return _fail(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        return _fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")

    from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration
    from vipllava_jax.processing.processor import VipLlavaProcessor
    from vipllava_jax.processing.prompts import build_prompt, cut_answer, stop_tokens

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
        eos, stops = stop_tokens(processor.tokenizer, args.template)
        sample = bool(args.temperature)  # 0 means greedy, as users expect
        kwargs = dict(
            max_new_tokens=args.max_new_tokens, do_sample=sample,
            temperature=args.temperature if sample else 1.0, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, eos_token_id=eos, pad_token_id=processor.pad_token_id,
            stop_strings=stops, tokenizer=processor.tokenizer,  # the chat turn's end
        )
        if args.stream:
            new, shown = [], ""
            for piece in model.generate_stream(**inputs, **kwargs):
                new.extend(piece[0].tolist())
                text = _visible(processor.decode(new, skip_special_tokens=False), stops)
                print(text[len(shown):], end="", flush=True)
                shown = text
            print()
        else:
            out = model.generate(**inputs, **kwargs)
            text = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=False)
            print(cut_answer(text, stops))
    except (VipLlavaError, OSError) as e:  # OSError: unreadable image, unwritable --save-marked
        print(f"vipllava-generate: error: {e}", file=sys.stderr)
        return 2
    return 0


def _visible(text: str, stops: list[str]) -> str:
    """What a stream may show of `text`: up to a stop string, without a trailing part that may
    still become one, and without pad tokens."""
    for s in stops:
        text = text.split(s, 1)[0]
    for s in stops:
        for n in range(len(s) - 1, 0, -1):
            if text.endswith(s[:n]):
                text = text[:-n]
                break
    return text.lstrip()


def _visual_prompt(args: argparse.Namespace):
    """The `VisualPrompt` the marker flags ask for, or None without --marker.

    Raises:
        VipLlavaError: flags that do not go together or do not parse.
    """
    from vipllava_jax.processing.visual_prompts import VisualPrompt

    if args.marker is None:
        stray = [f for f, v in (("--box", args.box), ("--point", args.point), ("--seg", args.seg),
                                ("--color", args.color), ("--alpha", args.alpha), ("--width", args.width),
                                ("--save-marked", args.save_marked))
                 if v is not None]
        if stray:
            raise VipLlavaError(f"{stray[0]} needs --marker")
        return None
    if sum(v is not None for v in (args.box, args.point, args.seg)) != 1:
        raise VipLlavaError("--marker needs exactly one of --box x0,y0,x1,y1, --point x,y or --seg x,y,x,y,...")
    box = _numbers("--box", args.box, 4) if args.box is not None else None
    point = _numbers("--point", args.point, 2) if args.point is not None else None
    polygons = tuple(_polygon(text) for text in args.seg) if args.seg is not None else None
    if args.alpha is not None and not 0 <= args.alpha <= 255:
        raise VipLlavaError(f"--alpha takes an integer 0-255, got {args.alpha}")
    if args.width is not None and args.width < 1:
        raise VipLlavaError(f"--width takes a whole number of pixels >= 1, got {args.width}")
    color = args.color or "red"
    if "," in color:
        color = _numbers("--color", color, 3)
        if not all(c.is_integer() for c in color):
            raise VipLlavaError(f"--color r,g,b takes integers 0-255, got {args.color!r}")
        color = tuple(int(c) for c in color)
    return VisualPrompt(marker=args.marker, box=box, point=point, polygons=polygons, color=color,
                        style=args.marker_style, seed=args.seed, alpha=args.alpha, width=args.width)


def _polygon(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) < 6 or len(values) % 2 or not all(math.isfinite(v) for v in values):
        raise VipLlavaError(f"--seg takes a polygon as x,y,x,y,... (3 points or more), got {text!r}")
    return values


def _numbers(flag: str, text: str, n: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise VipLlavaError(f"{flag} takes {n} comma-separated numbers, got {text!r}")
    return values


def _fail(message: str) -> int:
    print(f"vipllava-generate: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

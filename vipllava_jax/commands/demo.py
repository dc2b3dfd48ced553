"""`vipllava-demo`: mark a region, ask about it, get the answer, with the embedded tiny model.

The embedded model (`assets/tiny_vipllava/model`, an Orbax folder with its tokenizer) is a
VipLlava trained from scratch on a synthetic visual-prompt task (the repository's
`tools/tiny_vipllava/make.sh` reproduces it). By default the demo draws a red rectangle around
the middle object of the bundled scene (`assets/demo.png`), asks its colour (the shipped
model answers 98.5% of the task's held-out questions), prints the answer and writes the
marked image. `--image/--box/--marker/--color/--question` take your own (the tiny model only
knows scenes like the bundled one: three shapes, white, black or gray, in a row across the
middle, and the five questions of the task). Markers are drawn as the task's training images
have them (`processing.canvas.draw_marker`: line widths of a `MARKER_CANVAS` px wide image,
enlarged), whatever the image size.

With torch installed, the same checkpoint is exported to transformers (`orbax_to_hf`) and
transformers' PyTorch `generate` answers the same prompt: the demo prints both answers and
the largest logit difference of the prompt's forward pass.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from vipllava_jax.embedded import ASSETS, DEMO_IMAGE, EMBEDDED_MODEL  # noqa: F401  (public here too)

DEMO_BOX = (17, 17, 29, 29)  # the middle object of demo.png (a white square), padded by 1 px
DEMO_QUESTION = "What color is the marked object?"  # the answer here: white


def _box(text: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"--box takes x0,y0,x1,y1, got {text!r}")
    return box


def run(
    *, model_dir: str | Path = EMBEDDED_MODEL, image=DEMO_IMAGE, box=DEMO_BOX,
    marker: str = "rectangle", color: str = "red", question: str = DEMO_QUESTION,
    max_new_tokens: int = 8, compare: bool = True,
) -> dict:
    """Draws the marker, answers the question, and (with torch) asks transformers too.

    Returns:
        `{"marked": PIL image, "answer": str, "prompt": str}`, plus `"hf_answer"` and
        `"max_abs_diff"` (prompt logits, JAX vs transformers) when compared.
    """
    from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration
    from vipllava_jax.processing.canvas import draw_marker
    from vipllava_jax.processing.images import load_image
    from vipllava_jax.processing.processor import VipLlavaProcessor
    from vipllava_jax.processing.prompts import build_prompt, cut_answer, stop_tokens
    from vipllava_jax.processing.visual_prompts import VisualPrompt, crop_cuts_marker

    vp = VisualPrompt(marker=marker, box=box, color=color, style="constant")  # bad input: fail fast
    image = load_image(image)
    processor = VipLlavaProcessor.from_pretrained(model_dir)
    model = VipLlavaForConditionalGeneration.from_pretrained(model_dir)
    pre = processor.image_processor
    if pre.do_center_crop and crop_cuts_marker(image.size, vp, size=pre.size, crop_size=pre.crop_size):
        warnings.warn("the processor's center crop cuts off part of the marker", stacklevel=2)
    marked = draw_marker(image, vp)  # sized as the tiny model's training markers
    prompt = build_prompt(question)
    inputs = processor(text=prompt, images=marked)
    eos, stops = stop_tokens(processor.tokenizer)
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=processor.pad_token_id)
    seqs = model.generate(**inputs, do_sample=False, **kw)
    n = inputs["input_ids"].shape[1]
    result = {"marked": marked, "prompt": prompt,
              "answer": cut_answer(processor.decode(seqs[0, n:], skip_special_tokens=False), stops)}
    if not compare:
        return result
    try:
        import torch
        import transformers
    except ImportError:
        return result
    from vipllava_jax.convert import orbax_to_hf

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = orbax_to_hf(model_dir, Path(tmp) / "hf")
        ref = transformers.VipLlavaForConditionalGeneration.from_pretrained(hf_dir).eval()
    pt = {k: torch.tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        ref_seqs = ref.generate(**pt, do_sample=False, **kw).numpy()
        ref_logits = ref(**pt).logits.numpy()
    logits = np.asarray(model(**inputs).logits)
    result["hf_answer"] = cut_answer(processor.decode(ref_seqs[0, n:], skip_special_tokens=False), stops)
    result["max_abs_diff"] = float(np.abs(logits - ref_logits).max())
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vipllava-demo", description=__doc__.splitlines()[0])
    p.add_argument("--image", help="your image (default: the bundled scene, assets/demo.png)")
    p.add_argument("--box", type=_box, help="the region to mark, x0,y0,x1,y1 in pixels "
                   f"(default with the bundled image: {','.join(map(str, DEMO_BOX))})")
    p.add_argument("--marker", default="rectangle", help="rectangle, ellipse, triangle, point, "
                   "scribble, mask_contour, mask or arrow")
    p.add_argument("--color", default="red", help="marker colour: red, lime, blue, yellow, ...")
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--model", default=str(EMBEDDED_MODEL), help="model folder (default: the embedded tiny model)")
    p.add_argument("--save-marked", default="vipllava_demo_marked.png", metavar="PATH",
                   help="where to write the marked image (default: %(default)s in the current folder)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--no-compare", action="store_true", help="skip the transformers comparison")
    args = p.parse_args(argv)
    if args.image and args.box is None:
        p.error("--image needs --box (the region to mark)")

    from vipllava_jax.errors import VipLlavaError

    try:
        r = run(model_dir=args.model, image=args.image or DEMO_IMAGE, box=args.box or DEMO_BOX,
                marker=args.marker, color=args.color, question=args.question,
                max_new_tokens=args.max_new_tokens, compare=not args.no_compare)
        r["marked"].save(args.save_marked)
    except (VipLlavaError, OSError) as e:
        print(f"vipllava-demo: error: {e}", file=sys.stderr)
        return 2
    box = ",".join(f"{v:g}" for v in (args.box or DEMO_BOX))  # 17 and 17.0 print alike
    print(f"marked image ({args.color} {args.marker} at {box}) -> {Path(args.save_marked).resolve()}")
    print(f"question: {args.question}")
    print(f"answer: {r['answer']}")
    if "hf_answer" in r:
        same = "same" if r["hf_answer"] == r["answer"] else "DIFFERENT"
        print(f"transformers' PyTorch generate: {r['hf_answer']} ({same}); "
              f"max |logits - transformers' PyTorch logits| = {r['max_abs_diff']:.2e}")
    elif not args.no_compare:
        print("(install torch to compare against transformers' PyTorch model)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

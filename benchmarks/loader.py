"""Training-data loader throughput: records/s of `TrainDataLoader` inline, with worker threads
and with worker processes, on the synthetic visual-prompt task's data (48 px PNGs, seven-turn
conversations: `tools.synthetic`), no model in the loop.

    python -m benchmarks.loader [--scenes 2000] [--workers 2] [--batch 64] [--batches 60]
                                [--regions] [--upscale 1]

Every loader must yield the same batches (checked); the figure to compare with a training
step's appetite is records/s (batch size x steps/s). `--regions` makes every record a
ViP-LLaVA-Instruct region record (a refcocog id and a box, so the loader draws a marker on each
image as it reads it); `--upscale k` saves the images k times larger (ViP-LLaVA's images are
~500-640 px, where drawing and resizing cost more than at 48 px).

Measured on a shared 2-core CPU machine (`--scenes 400 --workers 2 --batch 32 --batches 8`,
records/s inline / 2 threads / 2 processes; noisy): 48 px plain 1735 / 1443 / 762, 48 px region
records 1233 / 1033 / 539; 480 px (`--upscale 10`) plain 172 / 179 / 157, 480 px region
records 137 / 121 / 120: drawing a marker costs about a fifth of a record's loading at 480 px.
grain was not measured (not installed here).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

from tools.synthetic import IMAGE_SIZE, write_dataset
from vipllava_jax.processing.processor import VipLlavaProcessor
from vipllava_jax.train.data import LoaderOptions, TrainDataLoader


def measure(data: Path, processor, workers: int, kind: str, batch: int, batches: int):
    options = LoaderOptions(batch_size=batch, max_length=176, num_workers=workers, worker_type=kind, seed=0)
    loader = TrainDataLoader(data / "train.jsonl", data, processor, options)
    it = iter(loader)
    out = [next(it)]  # workers started and warm
    t = time.perf_counter()
    out += [next(it) for _ in range(batches)]
    return batch * batches / (time.perf_counter() - t), out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=2000)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--regions", action="store_true", help="region records: a marker drawn per record")
    p.add_argument("--upscale", type=int, default=1, help="save the images this many times larger")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_dataset(data, train=args.scenes, val=0, test=0, seed=0)
        if args.regions or args.upscale > 1:
            as_regions(data / "train.jsonl", args.regions, args.upscale)
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(data / "tokenizer")
        processor = VipLlavaProcessor(tokenizer, image_size=IMAGE_SIZE, num_image_tokens=36)
        print(f"{os.cpu_count()} cores; batch {args.batch}, {args.batches} batches after the first")
        reference = None
        for workers, kind in ((0, "inline"), (args.workers, "threads"), (args.workers, "processes")):
            rate, batches = measure(data, processor, workers, "threads" if kind == "inline" else kind,
                                    args.batch, args.batches)
            reference = reference or batches
            same = all(np.array_equal(a[k], b[k]) for a, b in zip(reference, batches) for k in a)
            label = kind if kind == "inline" else f"{workers} {kind}"
            print(f"{label:>14}: {rate:8.0f} records/s   same batches as inline: {same}")


def as_regions(path: Path, regions: bool, upscale: int) -> None:
    """Rewrites the records as region records (a box in the middle of each image) and/or their
    images `upscale` times larger."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    side = IMAGE_SIZE * upscale
    for i, r in enumerate(records):
        if upscale > 1:
            image = path.parent / r["image"]
            PIL.Image.open(image).convert("RGB").resize((side, side), PIL.Image.Resampling.NEAREST).save(image)
        if regions:
            r["id"] = f"refcocog-gpt4v-{i}"
            r["bboxes"] = [[side / 6, side / 6, side * 5 / 6, side * 5 / 6]]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()

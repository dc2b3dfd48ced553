"""Training-data loader throughput: records/s of `TrainDataLoader` inline, with worker threads
and with worker processes, on the synthetic visual-prompt task's data (48 px PNGs, seven-turn
conversations: `tools.synthetic`), no model in the loop.

    python -m benchmarks.loader [--scenes 2000] [--workers 2] [--batch 64] [--batches 60]

Every loader must yield the same batches (checked); the figure to compare with a training
step's appetite is records/s (batch size x steps/s).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

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
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_dataset(data, train=args.scenes, val=0, test=0, seed=0)
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


if __name__ == "__main__":
    main()

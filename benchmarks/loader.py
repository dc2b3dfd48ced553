"""Training-data loader throughput: records/s of `TrainDataLoader` inline, with worker threads
and with worker processes, on the synthetic visual-prompt task's data (48 px PNGs, seven-turn
conversations: `tools.synthetic`), no model in the loop.

    python -m benchmarks.loader [--scenes 2000] [--workers 2] [--batch 64] [--batches 60]
                                [--regions] [--upscale 1] [--grain] [--rounds 1]

Every loader must yield the same batches (checked); the figure to compare with a training
step's appetite is records/s (batch size x steps/s). `--regions` makes every record a
ViP-LLaVA-Instruct region record (a refcocog id and a box, so the loader draws a marker on each
image as it reads it); `--upscale k` saves the images k times larger (ViP-LLaVA's images are
~500-640 px, where drawing and resizing cost more than at 48 px).

Measured on a shared 2-core CPU machine (`--scenes 400 --workers 2 --batch 32 --batches 8`,
records/s inline / 2 threads / 2 processes; noisy): 48 px plain 1735 / 1443 / 762, 48 px region
records 1233 / 1033 / 539; 480 px (`--upscale 10`) plain 172 / 179 / 157, 480 px region
records 137 / 121 / 120: drawing a marker costs about a fifth of a record's loading at 480 px.

`--grain` (`pip install grain`; not a dependency of the library) also loads the same
records through the same `TrainDataLoader.load_record` and collate with grain:
`MapDataset.source(...).shuffle(seed=0).map(load_record)`, read by 2 threads (`ReadOptions`) or
2 spawned processes (`mp_prefetch`, batches built in the workers); its rows are checked against
inline loading of the same records. `--rounds n` interleaves the modes n times and prints
medians. Shared 2-core CPU (load average ~3.5 from other jobs: ranges are wide), jax 0.10.2,
grain 0.2.18, `--scenes 1100 --workers 2 --batch 32 --batches 32 --grain`, median records/s,
inline / 2 threads / 2 processes / grain 2 threads / grain 2 processes:

- 48 px plain (3 rounds): 1716 / 1660 / 673 / 540 / 1018: grain's best is 0.59x inline;
- 480 px plain (`--upscale 10`, 3 rounds): 172 / 195 / 254 / 151 / 152: grain's best is 0.60x
  the pool's processes (ranges overlap: 124-261 against 149-204);
- 480 px region records (`--upscale 10 --regions`, 4 rounds over two runs): ~122 / ~117 / ~116 /
  ~108 / ~169: grain's processes 1.4x inline, ahead in each of the 4 rounds.

So grain is not faster overall here; the hand-written pool stays (docs/performance.md). Grain's
processes beat the pool's processes in 2 of 3 cases, probably because they return whole batches
(one pickle per batch) where the pool returns one record per job.
"""

from __future__ import annotations

import argparse
import functools
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
from vipllava_jax.train.data.conversation_loader import collate_examples
from vipllava_jax.train.data.records import parse_record


def measure(data: Path, processor, workers: int, kind: str, batch: int, batches: int):
    options = LoaderOptions(batch_size=batch, max_length=176, num_workers=workers, worker_type=kind, seed=0)
    loader = TrainDataLoader(data / "train.jsonl", data, processor, options)
    it = iter(loader)
    out = [next(it)]  # workers started and warm
    t = time.perf_counter()
    out += [next(it) for _ in range(batches)]
    return batch * batches / (time.perf_counter() - t), out


def _grain_load(loader: TrainDataLoader, item: tuple[int, bytes]):
    """One record through the loader's own per-record function (what its workers run), seeded
    as epoch 0. No bad records here: grain would need a `.filter` for `SkipRecord`s."""
    i, line = item
    return i, *loader.load_record(parse_record(line), (0, i))


def _grain_collate(loader: TrainDataLoader, rows):
    """The loader's collate, plus the record indices (to check the rows against inline)."""
    batch = collate_examples([r[1:] for r in rows], loader.options.max_length, loader.processor.pad_token_id)
    return {**batch, "index": np.array([r[0] for r in rows])}


def measure_grain(data: Path, processor, workers: int, kind: str, batch: int, batches: int):
    """records/s of the same records and per-record function on grain: `MapDataset.source`
    (record index, JSON line) -> seeded shuffle -> `TrainDataLoader.load_record` -> batch, read
    by `workers` threads (`ReadOptions`) or `workers` spawned processes (`mp_prefetch`, one
    reading thread each, whole batches built in the workers as MaxText does). Also whether the
    rows equal the inline loader's rows of the same records."""
    import grain
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads its absl flags (defaults); argparse has ours
        flags.FLAGS.mark_as_parsed()
    options = LoaderOptions(batch_size=batch, max_length=176, num_workers=0, seed=0)
    loader = TrainDataLoader(data / "train.jsonl", data, processor, options)
    n = len(loader.annotations)
    if n < batch * (batches + 1):
        raise SystemExit(f"--grain reads one epoch: needs --scenes >= {batch * (batches + 1)}")
    load, collate = functools.partial(_grain_load, loader), functools.partial(_grain_collate, loader)
    ds = grain.MapDataset.source([(i, loader.annotations.line(i)) for i in range(n)]).shuffle(seed=0).map(load)
    if kind == "threads":  # records spread over the threads, batched in the consumer
        it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=2 * batch))
                  .batch(batch, drop_remainder=True, batch_fn=collate))
    else:
        it = iter(ds.batch(batch, drop_remainder=True, batch_fn=collate)
                  .to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
                  .mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))
    out = [next(it)]  # workers started and warm
    t = time.perf_counter()
    out += [next(it) for _ in range(batches)]
    rate = batch * batches / (time.perf_counter() - t)
    getattr(it, "close", lambda: None)()
    first = out[0]
    inline = collate_examples([loader.load_record(loader.annotations.record(int(i)), (0, int(i)))
                               for i in first["index"]], options.max_length, processor.pad_token_id)
    return rate, all(np.array_equal(first[k], inline[k]) for k in inline)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=2000)
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--regions", action="store_true", help="region records: a marker drawn per record")
    p.add_argument("--upscale", type=int, default=1, help="save the images this many times larger")
    p.add_argument("--grain", action="store_true", help="also grain (threads, processes) on the same records")
    p.add_argument("--rounds", type=int, default=1, help="measure every mode this many times, interleaved")
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
        modes = [("inline", 0, "threads"), (f"{args.workers} threads", args.workers, "threads"),
                 (f"{args.workers} processes", args.workers, "processes")]
        if args.grain:
            try:
                import grain  # noqa: F401 - optional: only this benchmark uses it
            except ImportError:
                print("grain is not installed (pip install grain): grain modes skipped")
            else:
                modes += [(f"grain {args.workers} {kind}", args.workers, kind) for kind in ("threads", "processes")]
        rates, reference = {label: [] for label, _, _ in modes}, None
        for _ in range(args.rounds):  # modes interleaved per round: a shared machine's load drifts
            for label, workers, kind in modes:
                if label.startswith("grain"):
                    rate, same = measure_grain(data, processor, workers, kind, args.batch, args.batches)
                else:
                    rate, batches = measure(data, processor, workers, kind, args.batch, args.batches)
                    reference = reference or batches
                    same = all(np.array_equal(a[k], b[k]) for a, b in zip(reference, batches) for k in a)
                rates[label].append(rate)
                print(f"{label:>20}: {rate:8.0f} records/s   same rows as inline: {same}")
        if args.rounds > 1:
            print(f"median of {args.rounds} rounds (min-max):")
            for label, r in rates.items():
                print(f"{label:>20}: {np.median(r):8.0f} records/s   ({min(r):.0f}-{max(r):.0f})")


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

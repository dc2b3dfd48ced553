"""Local disk against a bucket: a tiny model's conversion and load, and a tiny run's checkpoint
save and restore, on local disk and on the local GCS emulator of the tests.

    python -m benchmarks.storage [--rounds 5]

The emulator (tests/helpers/gcs.py) is an in-memory server on the loopback, so the figures
measure the client stack (gcsfs, tensorstore's gcs driver, Orbax's commit protocol on an
object store: no rename, a commit marker), not a network. Medians over interleaved rounds after
one warm-up round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from tests.helpers import make_hf_model, make_word_tokenizer
from tests.helpers.gcs import GcsEmulator
from vipllava_jax.convert import hf_to_orbax
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration
from vipllava_jax.train.checkpoints import checkpoint_manager, restore
from vipllava_jax.train.config import TrainConfig
from vipllava_jax.train.mesh import mesh_from_spec
from vipllava_jax.train.step import init_train_state


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def one_round(src: Path, root: str, state, shardings, i: int) -> dict[str, float]:
    model_dir, run_dir = f"{root}/model-{i}", f"{root}/run-{i}"
    manager = checkpoint_manager(run_dir, None)

    def save():
        manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=ocp.args.JsonSave({"position": 1})))
        manager.wait_until_finished()

    out = {
        "convert": timed(lambda: hf_to_orbax(src, model_dir)),
        "from_pretrained": timed(lambda: VipLlavaForConditionalGeneration.from_pretrained(model_dir)),
        "checkpoint save": timed(save),
        "checkpoint restore": timed(lambda: restore(manager, 1, state, shardings)),
    }
    manager.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    src = tmp / "hf"
    make_hf_model(seed=1).save_pretrained(src)
    make_word_tokenizer(src, ["a b c"])
    hf_to_orbax(src, tmp / "model")
    mesh = mesh_from_spec("data=-1")
    model = VipLlavaForConditionalGeneration.from_pretrained(tmp / "model", mesh=mesh)
    _, state, shardings = init_train_state(model, TrainConfig(), mesh)
    leaves = jax.tree.leaves(state)
    print(f"model: {sum(x.size for x in jax.tree.leaves(model)) / 1e3:.0f}k parameters; run state: "
          f"{len(leaves)} arrays, {sum(x.nbytes for x in leaves) / 1e6:.2f} MB")
    results: dict[str, list[dict[str, float]]] = {"local disk": [], "GCS emulator": []}
    with GcsEmulator() as gcs:
        roots = {"local disk": str(tmp / "out"), "GCS emulator": gcs.bucket()}
        for i in range(args.rounds + 1):
            for where, root in roots.items():
                row = one_round(src, root, state, shardings, i)
                if i:  # round 0 warms up
                    results[where].append(row)
    print(f"seconds, median of {args.rounds} rounds: " + ", ".join(results["local disk"][0]))
    for where, rows in results.items():
        print(f"  {where:13s} " + "  ".join(f"{statistics.median(r[k] for r in rows):.3f}" for k in rows[0]))


if __name__ == "__main__":
    main()

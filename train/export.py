"""A finished (or running) training run as a model: its latest complete checkpoint, LoRA merged."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from vipllava_jax import storage
from vipllava_jax.registry import family_of
from vipllava_jax.train.checkpoints import checkpoint_manager, reason, restore
from vipllava_jax.train.config import RunConfig, TrainingError
from vipllava_jax.train.lora import merge_lora
from vipllava_jax.train.mesh import mesh_from_spec
from vipllava_jax.train.step import init_train_state, merge_model

RUN_CONFIG = "run_config.json"
# A run's own files in its output folder, never part of a model exported from it.
RUN_FILES = (RUN_CONFIG, "metrics.jsonl", ".run.lock")


def is_training_run(path: str | Path) -> bool:
    """A training run's output folder (it holds the model's files too); a gs:// URL too."""
    return (storage.path(path) / RUN_CONFIG).is_file()


def export_trained_model(output_dir: str | Path, dst: str | Path):
    """A training run's latest complete checkpoint (LoRA merged) as a model folder: the Orbax
    folder `from_pretrained` reads, with the run's tokenizer files (which the run copied from
    its model), so that `vipllava-eval` or a next training stage can start from it.

    Either may be a gs:// URL; returns `dst` (a Path, or an epath.Path). The tokenizer files
    are copied after `save_pretrained` has completed the folder (its marker written last):
    a reader that opens it in between finds the weights but not yet the tokenizer."""
    dst = storage.path(dst)
    load_trained_model(output_dir).save_pretrained(dst)
    for f in storage.path(output_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) and f.is_file():
            storage.copy_file(f, dst / f.name)
    return dst


def load_trained_model(output_dir: str | Path, step: int | None = None) -> nnx.Module:
    """The model of a training run's checkpoint (the latest complete one by default), with
    any LoRA adapters merged into its weights. The checkpoints are those under `output_dir`
    (a copied or moved run reads its own), not under the folder its run config recorded."""
    out = storage.path(output_dir)
    cfg = RunConfig.from_dict(json.loads(storage.read_text(out / RUN_CONFIG)))
    mesh = mesh_from_spec("data=1", jax.devices()[:1])
    model = family_of(cfg.model).model_class.from_pretrained(
        cfg.model, dtype=cfg.param_dtype, param_dtype=cfg.param_dtype)
    graphdef, state, shardings = init_train_state(model, cfg.train, mesh)
    manager = checkpoint_manager(out, read_only=True)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise TrainingError(f"no complete checkpoint in {out / 'checkpoints'}")
        if step not in manager.all_steps():
            raise TrainingError(f"no complete checkpoint of step {step} in {out / 'checkpoints'}")
        try:
            state, _ = restore(manager, step, state, shardings)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad files
            raise TrainingError(f"checkpoint {step} in {out / 'checkpoints'} does not restore "
                                f"({reason(e)})") from None
    finally:
        manager.close()
    return merge_lora(merge_model(graphdef, state))  # LoRA runs: adapters folded in

"""The two conversions, for every registered family: HF folder -> Orbax folder, and back.

    HF folder --config.json model_type--> registry Family
      --family.mapping: stream each tensor into our layout and dtype--> Orbax params/
      + config.json + format marker + tokenizer/processor files      (one atomic rename)

    Orbax folder (or a training run's output folder) --from_pretrained / the run's export-->
      model --family.mapping--> safetensors shards + config.json + side files
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vipllava_jax import hub, storage
from vipllava_jax.checkpoint import (
    MARKER,
    atomic_output,
    copy_side_files,
    flat_state,
    is_orbax_folder,
    mark_complete,
    normalize_dtype,
    write_hf_folder,
    write_orbax_folder,
)
from vipllava_jax.checkpoint.hf import open_weight_file, read_hf_params
from vipllava_jax.errors import CheckpointError
from vipllava_jax.registry import family_of, family_of_model
from vipllava_jax.train.export import RUN_FILES, is_training_run, load_trained_model


def hf_to_orbax(src, dst, *, dtype=None, overwrite=False, progress=False, projector=None) -> Path:
    """Converts an HF folder of any registered family to an Orbax folder; returns `dst`.
    `projector`: a weight file (the original's stage-1 `mm_projector.bin`) whose tensors
    replace the folder's of the same name."""
    src, dst = hub.resolve(src), storage.path(dst)
    family = family_of(src)
    config = family.config_class.from_pretrained(src)
    dtype = normalize_dtype(dtype or config.dtype)
    _, state = nnx.split(family.model_class.abstract(config, param_dtype=dtype))
    expected = {
        k: jax.ShapeDtypeStruct(v.get_value().shape, dtype) for k, (_, v) in flat_state(state).items()
    }
    with atomic_output(dst, overwrite=overwrite) as tmp:
        # Each tensor goes straight to a jax array in the target dtype (one copy of the model).
        params = read_hf_params(
            src, expected, tied_head=family.tied_head(config), progress=progress, mapping=family.mapping,
            convert=lambda _, a: jnp.asarray(np.asarray(a, dtype)),
            overlay=None if projector is None else open_weight_file(projector),
        )
        write_orbax_folder(tmp, params, config, dtype)
        del params
        copy_side_files(src, tmp)
        if family.side_files is not None:  # transformers writes local folders only
            with storage.staged(tmp) as local:
                family.side_files(storage.local_mirror(src), local, config)
        mark_complete(tmp)
    return dst


def orbax_to_hf(src, dst, *, overwrite=False, max_shard_bytes=5 * 2**30, progress=False) -> Path:
    """Converts an Orbax folder, or a training run's output folder (its latest complete
    checkpoint, LoRA merged), back to a folder transformers loads."""
    src, dst = storage.path(src), storage.path(dst)
    if is_training_run(src):
        model = load_trained_model(src)
    elif is_orbax_folder(src):
        family = family_of(src)
        model = family.model_class.from_pretrained(src, dtype=family.config_class.from_pretrained(src).dtype)
    else:
        raise CheckpointError(f"{src} is not a vipllava-jax Orbax folder (no {MARKER}) nor a training run")
    family = family_of_model(model)
    return write_hf_folder(model, src, dst, mapping=family.mapping, overwrite=overwrite,
                           max_shard_bytes=max_shard_bytes, progress=progress,
                           defaults=family.processor_files(model.config), skip=RUN_FILES)

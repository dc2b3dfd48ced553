"""Reading and writing transformers' checkpoint folders, one tensor at a time.

Reads `model.safetensors`, sharded safetensors (`model.safetensors.index.json`),
`pytorch_model.bin` and its sharded form (torch.load with weights_only=True; torch is only
needed for those). Every name is checked against the model before any tensor is read, so a
bad checkpoint fails fast with the offending tensor named.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from vipllava_jax import storage
from vipllava_jax.checkpoint.mapping import KeyMapping, hf_shape
from vipllava_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from vipllava_jax.errors import CheckpointError

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

# key -> (shape, read) where read() returns the tensor as a numpy array
TensorTable = dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]


def is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name in WEIGHT_INDEXES


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _open_bin(path: Path) -> TensorTable:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path} is a PyTorch pickle; reading it needs torch installed") from None
    remote = storage.is_remote(path)  # torch reads local files: a remote one is copied to memory
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(path)) if remote else path, map_location="cpu",
                           weights_only=True, mmap=not remote)
    except Exception as e:  # torch raises many types for corrupt or truncated zips
        # torch's messages span several lines; keep the line that names the cause.
        msg = " ".join(str(e).split())
        if "WeightsUnpickler error:" in msg:
            msg = msg.split("WeightsUnpickler error:")[1].split(". Please")[0].strip()
        raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {msg})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (a pickled {type(state).__name__})")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: entry {k} is not a tensor ({type(v).__name__})")
    return {k: (tuple(v.shape), lambda v=v: _torch_to_numpy(v)) for k, v in state.items()}


def open_weight_file(path: str | Path) -> TensorTable:
    """The tensors of one weight file (safetensors or a PyTorch `.bin`), by stored key."""
    return _open_file(storage.path(path))


def _open_file(path: Path) -> TensorTable:
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is missing")
    if path.suffix == ".bin":
        return _open_bin(path)
    f = SafetensorsFile(path)
    return {k: (f.shape(k), lambda k=k: f.read(k)) for k in f.keys()}


def open_hf_weights(folder: str | Path) -> TensorTable:
    """All tensors of an HF checkpoint folder, by the key they are stored under."""
    folder = storage.path(folder)
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{folder / index}: not a valid weight index") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(
                    f"{folder / index}: not a valid weight index (weight_map must map tensor names "
                    f"to file names, got a {type(weight_map).__name__})")
            table: TensorTable = {}
            for file in sorted(set(weight_map.values())):
                table.update(_open_file(folder / file))
            return table
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _open_file(folder / name)
    raise CheckpointError(
        f"no weights in {folder} (looked for {', '.join(WEIGHT_INDEXES + WEIGHT_FILES)})"
    )


def read_hf_params(
    folder: str | Path,
    expected: dict[str, jax.ShapeDtypeStruct],
    *,
    tied_head: bool,
    convert: Callable[[str, np.ndarray], object] | None = None,
    progress: bool = False,
    mapping: KeyMapping,
    overlay: TensorTable | None = None,
) -> dict[str, object]:
    """Reads an HF folder into our parameter paths.

    Args:
      expected: our parameter path -> abstract array (the shapes to check against).
      tied_head: the model ties its head to the embeddings, so a stored head is skipped.
      convert: applied to each tensor once it is in our layout (cast, device_put); each
        source tensor is released before the next is read, so memory peaks near one copy.
      mapping: the model family's name table.
      overlay: tensors that replace the folder's of the same (canonical) name, e.g. a
        stage-1 projector file applied onto a base model.
    """
    table = open_hf_weights(folder)
    if overlay:
        replaced = {mapping.canonical_key(k) for k in overlay}
        table = {k: v for k, v in table.items() if mapping.canonical_key(k) not in replaced} | overlay
    wanted = {}
    for path, abstract in expected.items():
        key, leaf = mapping.hf_key_for(path, len(abstract.shape))
        wanted[key] = (path, leaf, hf_shape(leaf, abstract.shape))
    plan = []
    seen: dict[str, str] = {}
    stored = {mapping.canonical_key(key): read for key, (_, read) in table.items()}
    for key, (shape, read) in table.items():
        canon = mapping.canonical_key(key)
        if mapping.ignored.search(canon) or (tied_head and canon in mapping.tied_keys):
            continue
        if canon not in wanted:
            raise CheckpointError(f"unexpected weight {key} in {folder}")
        if canon in seen:
            raise CheckpointError(f"weight {key} is stored twice (also as {seen[canon]})")
        seen[canon] = key
        path, leaf, want = wanted[canon]
        if tuple(shape) != want:
            if not mapping.resizable(canon, tuple(shape), want):
                raise CheckpointError(f"shape mismatch for {key}: checkpoint has {tuple(shape)}, model expects {want}")
            read = functools.partial(lambda r, k, w: mapping.resize(k, r(), w, lambda o: stored[o]()), read, canon, want)
        plan.append((key, path, leaf, read))
    missing = sorted(set(wanted) - set(seen))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"missing weight {missing[0]}{more} in {folder}")
    params = {}
    for _key, path, leaf, read in tqdm(plan, desc="tensors", unit="tensor", disable=not progress):
        array = leaf.to_jax(read())
        params[path] = convert(path, array) if convert else np.array(array)
        del array
    return params


def write_hf_params(
    params: dict[str, object],
    folder: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    progress: bool = False,
    mapping: KeyMapping,
) -> None:
    """Writes our parameters as transformers 5.x safetensors (sharded above max_shard_bytes)."""
    folder = storage.path(folder)
    entries = []
    for path in sorted(params):
        array = params[path]
        key, leaf = mapping.hf_key_for(path, array.ndim)
        shape = hf_shape(leaf, array.shape)
        entries.append((key, shape, np.dtype(array.dtype), lambda a=array, leaf=leaf: leaf.to_hf(np.asarray(a))))
    shards, size = [[]], 0
    for e in entries:
        nbytes = int(np.prod(e[1])) * e[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    bar = tqdm(total=len(entries), desc="tensors", unit="tensor", disable=not progress)

    def counted(shard):
        for key, shape, dtype, make in shard:
            def make_and_count(make=make):
                bar.update()
                return make()
            yield key, shape, dtype, make_and_count

    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", counted(shards[0]))
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(folder / name, counted(shard))
            for key, shape, dtype, _ in shard:
                weight_map[key] = name
                total += int(np.prod(shape)) * dtype.itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    bar.close()

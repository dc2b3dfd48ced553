"""Reading and writing weights: HF folders <-> our parameters <-> Orbax folders, for any family.

An Orbax folder written here holds:

    config.json        the HF config (transformers 5.x dialect), `dtype` = the stored dtype
    params/            an Orbax checkpoint of the parameters, nested by our module paths
    vipllava_jax.json  a marker with the format version, written last
    tokenizer/processor files copied from the HF source, if any

Folders may be local or `gs://` (`vipllava_jax.storage`). Locally a folder is written to a
temporary sibling and renamed when complete. On an object store, where a folder rename is a
copy, it is written in place behind a claim object, and the file a reader checks first (the
marker here, config.json in an HF folder) is written last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from vipllava_jax import storage
from vipllava_jax.checkpoint.hf import is_weight_file, read_hf_params, write_hf_params
from vipllava_jax.checkpoint.mapping import KeyMapping
from vipllava_jax.errors import CheckpointError
from vipllava_jax.nn.sharding import LOGICAL_AXIS_RULES, state_shardings

MARKER = "vipllava_jax.json"
PARAMS_DIR = "params"
FORMAT = {"format": "vipllava-jax-orbax", "version": 1}
DTYPES = ("float32", "bfloat16", "float16")


def normalize_dtype(dtype) -> str:
    name = str(jnp.dtype(str(dtype).removeprefix("torch.")))
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    return name


def is_orbax_folder(path: str | Path) -> bool:
    return (storage.path(path) / MARKER).is_file()


# -- flat path dicts <-> nested trees ---------------------------------------------------------

def flat_state(state: nnx.State) -> dict[str, tuple[tuple, nnx.Variable]]:
    """Our dotted parameter path -> (its path in the NNX state, its Variable)."""
    return {".".join(map(str, p)): (tuple(p), v) for p, v in nnx.to_flat_state(state)}


def nest(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# -- writing folders atomically ----------------------------------------------------------------

@contextlib.contextmanager
def atomic_output(dst: str | Path, *, overwrite: bool = False):
    """Yields a temporary sibling of `dst`; renames it to `dst` only if the block succeeds.

    The temporary folder is `.DST.tmp-PID`; those of processes no longer running (killed
    converters) are removed first. Without `overwrite`, a `dst` that another process wrote
    meanwhile is an error and stays as that process wrote it. A `gs://` destination: see
    `_remote_output`."""
    if storage.is_remote(dst):
        with _remote_output(storage.path(dst), overwrite) as out:
            yield out
        return
    dst = Path(dst).absolute()
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        what = "a dangling symbolic link" if not dst.exists() else "already exists"
        raise CheckpointError(f"{dst} {what} (pass --overwrite to replace it)")
    remove_stale_temporaries(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _commit(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


CLAIM = ".vipllava_jax.writing"


@contextlib.contextmanager
def _remote_output(dst, overwrite: bool):
    """Yields `dst` itself, claimed by a create-if-absent object `dst/CLAIM` (a second writer
    fails at once); on failure everything written is removed; the claim goes last. Readers
    look for the marker (or config.json), which the writer writes after everything else."""
    if dst.exists():  # any object under the prefix
        if not overwrite:
            raise CheckpointError(f"{dst} already exists (pass --overwrite to replace it)")
        storage.rmtree(dst)
    if not storage.create_exclusive(dst / CLAIM, f"{os.getpid()}\n"):
        raise CheckpointError(f"{dst} is being written by another process")
    try:
        yield dst
    except BaseException:
        storage.rmtree(dst)
        raise
    (dst / CLAIM).unlink()


def _commit(tmp: Path, dst: Path, overwrite: bool) -> None:
    if not overwrite:
        # rename(2) onto an existing non-empty folder fails: of two converters racing to one
        # destination, only the first to finish succeeds.
        try:
            if dst.exists() or dst.is_symlink():
                raise FileExistsError
            tmp.rename(dst)
        except OSError:
            raise CheckpointError(
                f"{dst} was written by another process meanwhile; this result was discarded "
                "(pass --overwrite to replace it)") from None
        return
    if dst.exists() or dst.is_symlink():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
        tmp.rename(dst)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:  # DST was a file or a link: rmtree would leave it behind
            old.unlink()
    else:
        tmp.rename(dst)


def remove_stale_temporaries(dst: str | Path) -> list[Path]:
    """Removes `.DST.tmp-PID` / `.DST.old-PID` siblings of `dst` whose process is gone (on
    this machine); returns what was removed."""
    dst = Path(dst).absolute()
    removed = []
    for p in dst.parent.glob(f".{dst.name}.*-*"):
        kind, _, pid = p.name[len(dst.name) + 2:].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _process_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# -- Orbax -------------------------------------------------------------------------------------

def save_params(params: dict[str, object], path: Path) -> None:
    # Without OCDBT each tensor's chunks go to disk as they are encoded; OCDBT holds the
    # encoded chunks of the whole tree in memory until its final commit, which raises the
    # converter's peak memory (docs/performance.md, "Converter memory"). Restore reads either.
    ckptr = ocp.StandardCheckpointer(use_ocdbt=False)
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_skip_ocdbt_merge_warning)
    absl_logger.addFilter(_skip_errors)  # a failed write: its reason is the CheckpointError's
    try:
        ckptr.save(storage.absolute(path), nest(params))
        ckptr.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - tensorstore's errors span many lines
        raise CheckpointError(f"cannot write {path}: {_short_reason(e)}") from None
    finally:
        # An interrupted save still has Orbax threads writing: wait for them, so that the
        # caller's cleanup is not followed by late writes.
        with contextlib.suppress(Exception):
            ckptr.wait_until_finished()
        ckptr.close()
        absl_logger.removeFilter(_skip_ocdbt_merge_warning)
        absl_logger.removeFilter(_skip_errors)


def _skip_errors(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def _short_reason(e: BaseException) -> str:
    """One line for an Orbax/tensorstore error: the OS error it names, else its first line."""
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
        return os.strerror(int(code.group(1)))
    m = re.search(r"OS error(?: \d+)?: ([^\]\"\n]+)", text) or re.search(r"\[Errno \d+\] ([^\n'\"]+)", text)
    if m:
        return m.group(1).strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _skip_ocdbt_merge_warning(record: logging.LogRecord) -> bool:
    """Orbax warns on every non-OCDBT save that it found no OCDBT files to merge."""
    return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


def restore_params(path: Path, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restores onto `target`'s shapes, dtypes (cast if stored otherwise) and shardings."""
    path = storage.absolute(path)
    ckptr = ocp.StandardCheckpointer()
    try:
        stored = flatten(ckptr.metadata(path).item_metadata.tree)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable Orbax checkpoint ({type(e).__name__})") from None
    for name in stored:
        if name not in target:
            raise CheckpointError(f"unexpected weight {name} in {path}")
    for name, want in target.items():
        if name not in stored:
            raise CheckpointError(f"missing weight {name} in {path}")
        if tuple(stored[name].shape) != tuple(want.shape):
            raise CheckpointError(
                f"shape mismatch for {name}: checkpoint has {tuple(stored[name].shape)}, "
                f"model expects {tuple(want.shape)}"
            )
    try:
        restored = flatten(ckptr.restore(path, nest(target)))
    except Exception as e:  # noqa: BLE001 - a damaged chunk: tensorstore's errors span many lines
        raise CheckpointError(f"{path}: damaged Orbax checkpoint ({_short_reason(e)})") from None
    return {
        k: jax.device_put(v, target[k].sharding) if isinstance(v, np.ndarray) else v
        for k, v in restored.items()
    }


# -- models ------------------------------------------------------------------------------------

def load_into(abstract, path: str | Path, *, param_dtype, mapping: KeyMapping, tied_head: bool,
              mesh=None, rules=None):
    """An abstract model (`Model.abstract(...)`) filled from an Orbax or an HF folder, each
    parameter in `param_dtype`, sharded on `mesh` by the logical-axis rules if given."""
    path = storage.path(path)
    graphdef, state = nnx.split(abstract)
    flat = flat_state(state)
    if mesh is not None:
        shard_state = state_shardings(state, mesh, rules or LOGICAL_AXIS_RULES)
        shardings = {k: v.get_value() for k, (_, v) in flat_state(shard_state).items()}
    else:
        shardings = dict.fromkeys(flat, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    target = {
        k: jax.ShapeDtypeStruct(v.get_value().shape, param_dtype, sharding=shardings[k])
        for k, (_, v) in flat.items()
    }
    if is_orbax_folder(path):
        arrays = restore_params(path / PARAMS_DIR, target)
    else:
        arrays = read_hf_params(
            path, target, tied_head=tied_head, mapping=mapping,
            convert=lambda k, a: jax.device_put(np.asarray(a, param_dtype), target[k].sharding),
        )
    state = nnx.from_flat_state([(p, v.replace(arrays[k])) for k, (p, v) in flat.items()])
    return nnx.merge(graphdef, state)


def model_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Our dotted parameter path -> the parameter's array."""
    return {k: v.get_value() for k, (_, v) in flat_state(nnx.state(model, nnx.Param)).items()}


def write_orbax_folder(tmp: Path, params: dict, config, dtype: str) -> None:
    """Params and config.json (any model family's config, saying `dtype`); `mark_complete`
    then ends the folder."""
    save_params(params, tmp / PARAMS_DIR)
    config.save_pretrained(tmp, dtype=dtype)


def mark_complete(folder: Path) -> None:
    """The format marker: written last, it says the Orbax folder is whole."""
    (folder / MARKER).write_text(json.dumps(FORMAT) + "\n")


def save_model(model, path, *, overwrite=False) -> None:
    """`model.save_pretrained` of either family: an Orbax folder in the weights' dtype."""
    params = model_params(model)
    dtype = normalize_dtype(next(iter(params.values())).dtype)
    with atomic_output(path, overwrite=overwrite) as tmp:
        write_orbax_folder(tmp, params, model.config, dtype)
        mark_complete(tmp)


def write_hf_folder(model, side_files_from, dst, *, mapping: KeyMapping, overwrite=False,
                    max_shard_bytes=5 * 2**30, progress=False, defaults: dict[str, dict] | None = None,
                    skip: tuple[str, ...] = ()) -> Path:
    """`model`'s weights as safetensors (names from `mapping`) + config.json in the weights'
    dtype, with the tokenizer and processor files of `side_files_from` (but `skip`), and the
    JSON files of `defaults` that the source lacks, written atomically (config.json last)."""
    dst = storage.path(dst)
    params = model_params(model)
    dtype = normalize_dtype(next(iter(params.values())).dtype)
    with atomic_output(dst, overwrite=overwrite) as tmp:
        write_hf_params(params, tmp, max_shard_bytes=max_shard_bytes, progress=progress, mapping=mapping)
        copy_side_files(side_files_from, tmp, skip=skip)
        for name, content in (defaults or {}).items():
            if not (tmp / name).exists():
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        model.config.save_pretrained(tmp, dtype=dtype)
    return dst


def copy_side_files(src: Path, dst: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Tokenizer, processor and generation files travel with the weights."""
    skip = {"config.json", MARKER, *skip}
    for f in storage.path(src).iterdir():
        if f.is_file() and f.name not in skip and not is_weight_file(f.name) and not f.name.startswith("."):
            storage.copy_file(f, dst / f.name)

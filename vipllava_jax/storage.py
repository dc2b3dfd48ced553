"""Local paths and `gs://` URLs behind one pathlib-like API.

    storage.path("runs/a")         -> pathlib.Path            (local: exactly as before)
    storage.path("gs://bucket/a")  -> etils.epath.Path        (files through fsspec/gcsfs;
                                                               Orbax reads/writes arrays with
                                                               tensorstore's gcs driver itself)

Object stores have no atomic folder rename and no exclusive file create. What this module
offers instead, and what the rest of the package builds on:

- `create_exclusive` / `read_versioned` / `delete_if_version`: an object created only if
  absent and deleted only if unchanged (GCS generation preconditions; a hard link locally).
  The training run lock uses them.
- `local_mirror`: a remote model folder's small files (config, tokenizer, processor) copied
  to a local cache, for the transformers classes that read only local folders; `local_copy`
  (a whole folder, weights too) and `staged` (a local folder uploaded afterwards) likewise.
- `retry`: a transient read error (a 503, a reset connection) retried with backoff.

`gs://` needs gcsfs (`pip install "vipllava-jax[gcs]"`); credentials are the Google default
ones (`gcloud auth application-default login`, or the TPU VM's service account).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pathlib
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from vipllava_jax.errors import VipLlavaError

T = TypeVar("T")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Weights never go to the local mirror: Orbax params/ and checkpoints/ stay remote and are read
# by tensorstore; safetensors are read by ranged reads.
_MIRROR_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")

PathLike = str | os.PathLike


class StorageError(VipLlavaError):
    """A remote path that cannot be used (unsupported scheme, missing client library)."""


def is_remote(p: PathLike) -> bool:
    """`gs://...` (any `scheme://`), as a string or an epath.Path."""
    return bool(_URL.match(os.fspath(p)))


def path(p: PathLike):
    """A local `pathlib.Path`, or an `etils.epath.Path` for `gs://` URLs."""
    if not is_remote(p):
        return pathlib.Path(p)
    text = os.fspath(p)
    if not text.startswith("gs://"):
        raise StorageError(f"{text}: only local paths and gs:// URLs are supported")
    try:
        import gcsfs  # noqa: F401 - epath's gs:// backend without TensorFlow
        from etils import epath
    except ImportError:
        raise StorageError(f"{text}: gs:// paths need gcsfs (pip install \"vipllava-jax[gcs]\")") from None
    _no_listing_cache()
    return epath.Path(text)


@functools.cache
def _no_listing_cache() -> None:
    """gcsfs caches folder listings per process: another process's new checkpoint or marker
    would stay unseen. Set before the first filesystem is made (fsspec's per-protocol config)."""
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


def absolute(p: PathLike):
    """Local paths made absolute (Orbax wants them so); URLs are already."""
    q = path(p)
    return q if is_remote(q) else q.absolute()


def copy_file(src: PathLike, dst: PathLike) -> None:
    if not is_remote(src) and not is_remote(dst):
        shutil.copy2(src, dst)
    else:
        path(dst).write_bytes(path(src).read_bytes())


def rmtree(p: PathLike) -> None:
    """Removes a folder (or file) and everything below it; nothing there is not an error."""
    q = path(p)
    if not is_remote(q):
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q, ignore_errors=True)
        else:
            q.unlink(missing_ok=True)
        return
    fs, key = _fs(q)
    if fs.exists(key):
        fs.rm(key, recursive=True)


def move_tree(src: PathLike, dst: PathLike) -> None:
    """A rename locally; on an object store, a copy then a delete (not atomic)."""
    if not is_remote(src):
        pathlib.Path(src).rename(dst)
        return
    fs, key = _fs(path(src))
    _, dst_key = _fs(path(dst))
    fs.copy(key, dst_key, recursive=True)
    fs.rm(key, recursive=True)


def size(p: PathLike) -> int:
    """A file's size in bytes."""
    if not is_remote(p):
        return os.path.getsize(p)
    fs, key = _fs(p)
    return int(fs.size(key))


def _fs(p) -> tuple[Any, str]:
    """The fsspec filesystem of a remote path and its key there (bucket/object)."""
    import fsspec

    text = os.fspath(path(p))
    fs = fsspec.filesystem("gcs", finalize_on_close=True)  # the instance epath.Path uses
    return fs, text.split("://", 1)[1].rstrip("/")


def local_mirror(folder: PathLike) -> pathlib.Path:
    """`folder` itself when local; for a remote model folder, a local cache folder holding its
    top-level config, tokenizer and processor files (refreshed on each call; no weights)."""
    if not is_remote(folder):
        return pathlib.Path(folder)
    remote = path(folder)
    root = pathlib.Path(os.environ.get("VIPLLAVA_JAX_CACHE", pathlib.Path.home() / ".cache" / "vipllava_jax"))
    local = root / "remote" / hashlib.sha256(os.fspath(remote).encode()).hexdigest()[:16]
    local.mkdir(parents=True, exist_ok=True)
    for f in remote.iterdir():
        if f.name.endswith(_MIRROR_SUFFIXES) and f.is_file():
            data = read_bytes(f)
            tmp = local / f".{f.name}.tmp-{os.getpid()}"
            tmp.write_bytes(data)
            tmp.replace(local / f.name)
    return local


@contextlib.contextmanager
def staged(folder: PathLike) -> Iterator[pathlib.Path]:
    """A local folder to write into for libraries that write only locally (transformers'
    `save_pretrained`): `folder` itself when local; else a temporary folder whose files are
    uploaded to `folder` when the block succeeds."""
    if not is_remote(folder):
        yield pathlib.Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="vipllava_jax-") as tmp:
        yield pathlib.Path(tmp)
        for f in sorted(pathlib.Path(tmp).rglob("*")):
            if f.is_file():
                copy_file(f, path(folder) / f.relative_to(tmp).as_posix())


@contextlib.contextmanager
def local_copy(folder: PathLike) -> Iterator[pathlib.Path]:
    """`folder` itself when local; else a temporary local copy of it, whole (weights too),
    removed after the block."""
    if not is_remote(folder):
        yield pathlib.Path(folder)
        return
    fs, key = _fs(folder)
    with tempfile.TemporaryDirectory(prefix="vipllava_jax-") as tmp:
        fs.get(key + "/", tmp + "/", recursive=True)
        yield pathlib.Path(tmp)


def retry(fn: Callable[[], T], *, what: str, attempts: int = 4, first_wait: float = 0.5) -> T:
    """`fn()`, again after 0.5, 1, 2 s when it fails with a transient error (a connection or
    server error of a remote read); a missing file or a bad argument fails at once."""
    for i in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, ValueError):
            raise
        except (OSError, TimeoutError, ConnectionError) as e:
            if i == attempts - 1:
                raise OSError(f"{what}: {type(e).__name__}: {str(e).strip()[:200]} "
                              f"(after {attempts} attempts)") from None
            time.sleep(first_wait * 2 ** i)
    raise AssertionError("unreachable")


def read_bytes(p: PathLike) -> bytes:
    """A file's bytes; a remote read is retried on transient errors (`retry`)."""
    q = path(p)
    return retry(q.read_bytes, what=os.fspath(q)) if is_remote(q) else q.read_bytes()


def read_text(p: PathLike) -> str:
    """A file's text; a remote read is retried on transient errors (`retry`)."""
    q = path(p)
    return retry(q.read_text, what=os.fspath(q)) if is_remote(q) else q.read_text()


def write_text(p: PathLike, text: str) -> None:
    """Writes a file whole; on an object store one upload (atomic there), retried on transient
    errors."""
    q = path(p)
    if is_remote(q):
        retry(lambda: q.write_text(text), what=os.fspath(q))
    else:
        q.write_text(text)


# -- create-if-absent / delete-if-unchanged ---------------------------------------------------

def create_exclusive(p: PathLike, text: str) -> bool:
    """Writes `text` to `p` only if `p` does not exist; False when it does."""
    if not is_remote(p):  # written aside, then linked in: never seen empty
        tmp = f"{os.fspath(p)}.tmp-{os.getpid()}-{threading.get_ident()}"
        with open(tmp, "w") as f:
            f.write(text)
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    from google.api_core.exceptions import PreconditionFailed

    try:
        _blob(p).upload_from_string(text, if_generation_match=0)
    except PreconditionFailed:
        return False
    return True


def read_versioned(p: PathLike) -> tuple[str, object] | None:
    """(text, version) of `p`, None when absent. The version changes on every write."""
    if not is_remote(p):
        try:
            with open(p) as f:
                st = os.fstat(f.fileno())
                return f.read(), (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return None
    from google.api_core.exceptions import NotFound

    blob = _blob(p)
    try:
        data = blob.download_as_bytes()
    except NotFound:
        return None
    return data.decode(errors="replace"), blob.generation


def delete_if_version(p: PathLike, version: object) -> bool:
    """Deletes `p` if it is still the version `read_versioned` saw; False otherwise."""
    if not is_remote(p):
        now = read_versioned(p)
        if now is None or now[1] != version:
            return False
        pathlib.Path(p).unlink(missing_ok=True)
        return True
    from google.api_core.exceptions import NotFound, PreconditionFailed

    try:
        _blob(p).delete(if_generation_match=version)
    except (PreconditionFailed, NotFound):
        return False
    return True


def _blob(p: PathLike):
    path(p)  # the one-line error when the client libraries are missing
    bucket, _, name = os.fspath(p).removeprefix("gs://").partition("/")
    return _client(os.environ.get("STORAGE_EMULATOR_HOST")).bucket(bucket).blob(name)


@functools.cache
def _client(emulator: str | None):
    """One client per endpoint (the real GCS, or an emulator named by STORAGE_EMULATOR_HOST)."""
    from google.cloud import storage as gcs

    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return gcs.Client(project="emulator", credentials=AnonymousCredentials())
    return gcs.Client()

"""Hub ids wherever a model folder is taken: `org/name` (optionally at a revision) resolves to
a folder in the standard Hugging Face cache, through huggingface_hub.

The cache, `HF_HOME`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` work as for transformers. Only the
files a model needs are fetched: configs, the tokenizer and processor files, and its weights
(safetensors when the repository has them, else PyTorch `.bin`).
"""

from __future__ import annotations

import os
from pathlib import Path

from vipllava_jax import storage
from vipllava_jax.errors import CheckpointError

# Configs, tokenizer and processor files (json, sentencepiece, vocab/merges, chat templates).
SIDE_FILES = ("*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken")
WEIGHTS = (("*.safetensors",), ("*.bin",))  # in order of preference


def is_hub_id(name: str | os.PathLike) -> bool:
    """`org/name` or `name` that is not an existing path (a hub repository id's shape)."""
    text = os.fspath(name)
    if storage.is_remote(text) or Path(text).exists() or text.startswith((".", "/", "~")) or text.endswith("/"):
        return False
    parts = text.split("/")
    return 1 <= len(parts) <= 2 and all(p and p.strip() == p and "\\" not in p for p in parts)


def resolve(path_or_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A folder for `path_or_id`: the path itself (a `gs://` URL: an epath.Path), or the cached snapshot of a hub id
    (downloaded first unless `HF_HUB_OFFLINE` is set). One-line `CheckpointError` otherwise."""
    if not is_hub_id(path_or_id):
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to hub ids, not to the folder {path_or_id}")
        return storage.path(path_or_id)
    repo_id = os.fspath(path_or_id)
    from huggingface_hub import snapshot_download  # (slow to import: only for hub ids)
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = None
        for weights in WEIGHTS:
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                            allow_patterns=[*SIDE_FILES, *weights]))
            if any(folder.glob(weights[0])):
                break
    except (LocalEntryNotFoundError, HfHubHTTPError, HFValidationError, OSError) as e:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub or in its cache"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{repo_id!r} is neither a local folder nor a model {where}: {reason}") from None
    return folder

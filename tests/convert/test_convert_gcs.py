"""`vipllava-convert` and `from_pretrained` with gs:// folders, against the local GCS emulator
(`tests/helpers/gcs.py`); the reference is transformers' PyTorch model."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers

from tests.helpers import make_inputs, torch_forward
from tests.helpers.convert import ATOL, SIDE_FILES, convert, jax_logits, max_err
from vipllava_jax import storage
from vipllava_jax.checkpoint import CLAIM, MARKER
from vipllava_jax.convert import conversions, hf_to_orbax
from vipllava_jax.errors import CheckpointError


def upload(folder, url: str) -> str:
    for f in folder.iterdir():
        storage.copy_file(f, storage.path(url) / f.name)
    for name, text in SIDE_FILES.items():
        (storage.path(url) / name).write_text(text)
    return url


def names(url: str) -> set[str]:
    return {p.name for p in storage.path(url).iterdir()}


def test_hf_in_a_bucket_to_orbax_in_a_bucket_and_back(tiny_hf, gcs_bucket, tmp_path, capsys):
    model, folder = tiny_hf
    src = upload(folder, f"{gcs_bucket}/hf")  # safetensors read by ranged reads
    assert convert("hf-to-orbax", src, f"{gcs_bucket}/orbax") == 0
    assert f"wrote {gcs_bucket}/orbax" in capsys.readouterr().out
    assert {MARKER, "config.json", "params", *SIDE_FILES} <= names(f"{gcs_bucket}/orbax")
    assert CLAIM not in names(f"{gcs_bucket}/orbax")

    inputs = make_inputs(model.config)
    ref, _ = torch_forward(model, inputs)
    assert max_err(jax_logits(f"{gcs_bucket}/orbax", inputs), ref, inputs) <= ATOL

    # --check runs transformers on a local copy of the bucket folder
    assert convert("orbax-to-hf", f"{gcs_bucket}/orbax", f"{gcs_bucket}/hf-again", "--check") == 0
    local = tmp_path / "hf-again"
    local.mkdir()
    for f in storage.path(f"{gcs_bucket}/hf-again").iterdir():
        storage.copy_file(f, local / f.name)
    back = transformers.VipLlavaForConditionalGeneration.from_pretrained(local)
    want = model.state_dict()
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)


def test_a_failed_write_leaves_nothing_in_the_bucket(tiny_hf, gcs_bucket, monkeypatch):
    _, folder = tiny_hf
    dst = f"{gcs_bucket}/orbax"

    def fail(_):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(conversions, "mark_complete", fail)
    with pytest.raises(RuntimeError, match="disk gone"):
        hf_to_orbax(folder, dst)
    assert not storage.path(dst).exists()


def test_a_second_writer_is_refused(tiny_hf, gcs_bucket, monkeypatch):
    _, folder = tiny_hf
    dst = f"{gcs_bucket}/orbax"
    # another converter claimed the folder between our emptiness check and our claim
    monkeypatch.setattr(storage, "create_exclusive", lambda *_: False)
    with pytest.raises(CheckpointError, match="being written by another process"):
        hf_to_orbax(folder, dst)
    monkeypatch.undo()
    storage.path(dst).mkdir(parents=True, exist_ok=True)
    (storage.path(dst) / CLAIM).write_text("1\n")  # a killed writer's claim
    with pytest.raises(CheckpointError, match="already exists"):
        hf_to_orbax(folder, dst)
    hf_to_orbax(folder, dst, overwrite=True)
    assert MARKER in names(dst) and CLAIM not in names(dst)


def test_gs_without_gcsfs_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(storage.StorageError, match=r"gs:// paths need gcsfs \(pip install"):
        storage.path("gs://bucket/model")
    with pytest.raises(storage.StorageError, match="only local paths and gs:// URLs"):
        storage.path("s3://bucket/model")
    assert isinstance(storage.path("models/a"), type(storage.path(".")))
    assert not any(storage.is_remote(p) for p in ("a/b", "/a/b", "./gs:/x"))

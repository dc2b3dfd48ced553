"""What library code can rely on from the `gcs`/`gcs_bucket` fixtures (tests/helpers/gcs.py):
Orbax (OCDBT and not) and tensorstore, etils.epath (via gcsfs) and google-cloud-storage
generation preconditions all work against gs:// paths, with no network and no credentials."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture
def tree():
    return {
        "w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64),
        "sub": {"b": jnp.ones((7,), jnp.bfloat16), "step": jnp.array(3, jnp.int32)},
    }


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_orbax_checkpoint_manager_ocdbt_async(gcs_bucket, tree):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
    with ocp.CheckpointManager(f"{gcs_bucket}/run/ckpt", options=options) as mgr:
        for step in range(3):
            mgr.save(step, args=ocp.args.StandardSave(jax.tree.map(lambda x, s=step: x + s, tree)))
        mgr.wait_until_finished()
        assert mgr.all_steps() == [1, 2] and mgr.latest_step() == 2
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
        restored = mgr.restore(2, args=ocp.args.StandardRestore(target))
        _assert_same(restored, jax.tree.map(lambda x: x + 2, tree))
        mgr.delete(2)
        assert mgr.all_steps() == [1]
    with ocp.CheckpointManager(f"{gcs_bucket}/run/ckpt") as mgr:  # a fresh process's view
        assert mgr.latest_step() == 1


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_orbax_standard_checkpointer(gcs_bucket, tree, use_ocdbt):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer(use_ocdbt=use_ocdbt) as ckptr:
        ckptr.save(f"{gcs_bucket}/x", tree)
        ckptr.wait_until_finished()
        restored = ckptr.restore(f"{gcs_bucket}/x", jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
    _assert_same(restored, tree)


def test_tensorstore_kvstore_generations(gcs_bucket):
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "gcs", "bucket": gcs_bucket[5:], "path": "kv/"}).result()
    kv.write("a", b"one").result()
    first = kv.read("a").result()
    assert first.value == b"one" and first.state == "value"
    assert kv.read("a", if_not_equal=first.stamp.generation).result().state == "unspecified"
    kv.write("a", b"two").result()
    assert kv.read("a", if_not_equal=first.stamp.generation).result().value == b"two"
    assert kv.read("a", byte_range=slice(1, 3)).result().value == b"wo"
    assert kv.list().result() == [b"a"]


def test_epath(gcs_bucket):
    from etils import epath

    root = epath.Path(gcs_bucket) / "dir"
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("hello")
    payload = bytes(range(256)) * 64
    with (root / "sub" / "b.bin").open("wb") as f:
        f.write(payload)
    assert (root / "a.txt").read_text() == "hello"
    with (root / "sub" / "b.bin").open("rb") as f:  # ranged reads
        f.seek(1000)
        assert f.read(16) == payload[1000:1016]
        f.seek(-4, 2)
        assert f.read() == payload[-4:]
    assert root.exists() and root.is_dir() and (root / "a.txt").is_file()
    assert not (root / "missing").exists()
    assert sorted(p.name for p in root.iterdir()) == ["a.txt", "sub"]
    assert [p.name for p in root.glob("*/*.bin")] == ["b.bin"]  # epath: no "**" on gs://
    (root / "a.txt").unlink()
    assert not (root / "a.txt").exists()
    root.rmtree()
    assert not root.exists()


def test_generation_preconditions(gcs_bucket):
    from google.api_core.exceptions import NotFound, PreconditionFailed
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials())
    blob = client.bucket(gcs_bucket[5:]).blob("lock/owner")
    blob.upload_from_string(b"me", if_generation_match=0)  # create only if absent
    with pytest.raises(PreconditionFailed):
        blob.upload_from_string(b"you", if_generation_match=0)
    blob.reload()
    old = blob.generation
    blob.upload_from_string(b"me again", if_generation_match=old)
    blob.reload()
    assert blob.generation != old and blob.download_as_bytes() == b"me again"
    assert blob.download_as_bytes(start=3, end=5) == b"aga"
    with pytest.raises(PreconditionFailed):
        blob.delete(if_generation_match=old)  # stale generation
    blob.delete(if_generation_match=blob.generation)
    with pytest.raises(NotFound):
        blob.reload()

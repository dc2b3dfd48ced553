"""Training runs whose output_dir (and model) is a gs:// bucket, on the in-memory GCS
emulator (the `gcs` fixture): checkpoints, metrics.jsonl and run files land in the bucket, a
run stopped early resumes from it with the losses of an uninterrupted run, it exports, and
the run lock works on the bucket."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers.train import run_config
from vipllava_jax import storage
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration as JaxModel
from vipllava_jax.train import RunConfig, TrainingError, export_trained_model, load_trained_model, train
from vipllava_jax.train.checkpoints import checkpoint_manager, set_aside
from vipllava_jax.train.export import is_training_run
from vipllava_jax.train.hosts import LOCK, run_lock

STEPS = 4
SAVE_EVERY = 2


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (storage.path(run) / "metrics.jsonl").read_text().splitlines()]


def _steps(run) -> list[int]:
    return sorted(int(p.name) for p in (storage.path(run) / "checkpoints").iterdir() if p.name.isdigit())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock_text(pid: int) -> str:
    import socket

    return json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"})


@pytest.fixture(scope="module")
def runs(workspace, gcs):
    """One bucket: the tiny model uploaded to it; run `full` (model read from the bucket) for
    STEPS steps; run `cut`, stopped after step 3 (step 2 its last checkpoint)."""
    bucket = gcs.bucket()
    for f in sorted((workspace / "model").rglob("*")):
        if f.is_file():
            storage.copy_file(f, storage.path(bucket) / "model" / f.relative_to(workspace / "model").as_posix())
    full = train(dataclasses.replace(run_config(workspace, f"{bucket}/full", steps=STEPS, save_every=SAVE_EVERY),
                                     model=f"{bucket}/model"), progress=False)
    first = train(run_config(workspace, f"{bucket}/cut", steps=STEPS, save_every=SAVE_EVERY, stop_after=3),
                  progress=False)
    return {"bucket": bucket, "full": full, "first": first}


def test_run_writes_its_checkpoints_and_files_to_the_bucket(workspace, runs):
    run = storage.path(f"{runs['bucket']}/full")
    assert [m["step"] for m in runs["full"]] == list(range(1, STEPS + 1))
    assert _steps(run) == [2, 4]
    assert (run / "checkpoints" / "4" / "commit_success.txt").is_file()  # Orbax's marker on GCS
    assert [r["step"] for r in _rows(run)] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in _rows(run)] == [m["loss"] for m in runs["full"]]
    assert is_training_run(run)
    config = json.loads((run / "run_config.json").read_text())
    assert config["output_dir"] == os.fspath(run) and config["model"] == f"{runs['bucket']}/model"
    assert (run / "tokenizer.json").read_bytes() == (workspace / "model" / "tokenizer.json").read_bytes()
    assert any(p.name.startswith("events.out") for p in (run / "tensorboard").iterdir())
    assert not (run / LOCK).exists()  # released


def test_run_stopped_early_resumes_from_the_bucket_with_the_same_losses(workspace, runs):
    cut = f"{runs['bucket']}/cut"
    assert [m["step"] for m in runs["first"]] == [1, 2, 3]
    assert _steps(cut) == [2]  # step 3 was never saved
    assert [r["step"] for r in _rows(cut)] == [1, 2, 3]  # written when the run stopped
    # a lock left by a process that is gone (a killed run) does not block the resume
    assert storage.create_exclusive(storage.path(cut) / LOCK, _lock_text(_dead_pid()))
    rest = train(run_config(workspace, cut, steps=STEPS, save_every=SAVE_EVERY), progress=False)
    assert [m["step"] for m in rest] == [3, 4]
    assert [m["loss"] for m in rest] == [m["loss"] for m in runs["full"][2:]]
    rows = _rows(cut)  # the lost step 3's row replaced by the resumed run's
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows[2:]] == [m["loss"] for m in rest]
    assert _steps(cut) == [2, 4] and not (storage.path(cut) / LOCK).exists()

    # a checkpoint set aside (damaged, non-finite) moves beside the others, without its marker
    manager = checkpoint_manager(cut, read_only=True)
    moved = set_aside(manager, 4, "damaged")
    assert os.fspath(moved) == f"{cut}/checkpoints.damaged/4"
    assert manager.all_steps() == [2] and _steps(cut) == [2]
    assert (moved / "state").is_dir() and not (moved / "commit_success.txt").exists()
    manager.close()


def test_run_in_the_bucket_exports_to_the_bucket(workspace, runs):
    run, dst = f"{runs['bucket']}/full", f"{runs['bucket']}/exported"
    exported = export_trained_model(run, dst)
    assert os.fspath(exported) == dst
    assert (exported / "tokenizer.json").read_bytes() == (workspace / "model" / "tokenizer.json").read_bytes()
    ids = np.array([[1] + [100] * 4 + [5, 6, 7, 8]])
    pixels = np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype(np.float32)
    trained = load_trained_model(run)  # the run's last state: its step-4 checkpoint
    np.testing.assert_array_equal(np.asarray(JaxModel.from_pretrained(dst)(ids, pixels).logits),
                                  np.asarray(trained(ids, pixels).logits))


def test_run_lock_on_the_bucket(workspace, gcs_bucket):
    out = f"{gcs_bucket}/run"
    lock = storage.path(out) / LOCK
    # a live holder (this test's parent process, on this host): a one-line error, before any work
    assert storage.create_exclusive(lock, _lock_text(os.getppid()))
    with pytest.raises(TrainingError, match=rf"in use by process {os.getppid()} on ") as e:
        train(run_config(workspace, out, steps=2), progress=False)
    assert "\n" not in str(e.value) and f"remove {out}/{LOCK} " in str(e.value)
    assert json.loads(lock.read_text())["pid"] == os.getppid()  # left as it was

    # a stale one (its pid is gone) is taken over, and released at the end
    lock.write_text(_lock_text(_dead_pid()))
    with run_lock(out):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        # two takers of one stale version: only one delete can win
        text, version = storage.read_versioned(lock)
        assert storage.delete_if_version(lock, version)
        assert not storage.delete_if_version(lock, version)
        assert storage.create_exclusive(lock, text)
        # held by us: a second trainer in this process is refused too
        with pytest.raises(TrainingError, match=rf"in use by process {os.getpid()} "), run_lock(out):
            pass
    assert not lock.exists()

    # release deletes only our own lock: one rewritten meanwhile by another process stays
    with run_lock(out):
        lock.write_text(_lock_text(os.getppid()))
    assert json.loads(lock.read_text())["pid"] == os.getppid()


def test_run_config_reads_a_toml_file_in_the_bucket(gcs_bucket):
    config = storage.path(gcs_bucket) / "run.toml"
    config.write_text(f'model = "{gcs_bucket}/model"\ndata = "{gcs_bucket}/data.jsonl"\n'
                      f'output_dir = "{gcs_bucket}/run"\nsteps = 5\n[train]\nwarmup_steps = 1\n')
    cfg = RunConfig.from_file(os.fspath(config), ["steps=7"])
    assert (cfg.model, cfg.output_dir, cfg.steps) == (f"{gcs_bucket}/model", f"{gcs_bucket}/run", 7)

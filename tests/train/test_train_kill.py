"""A `vipllava-train` run killed with SIGKILL (during or right around an async Orbax save)
leaves only complete checkpoints, and a restarted run resumes from the last complete step
with the losses of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from tests.helpers.train import run_config
from vipllava_jax import storage
from vipllava_jax.train.loop import train

STEPS = 8
SAVE_EVERY = 2
KILL_AT = 5  # kill once a step >= this is logged, or once a save of a step >= 4 is in flight
TMP = ".orbax-checkpoint-tmp"


@pytest.fixture
def compile_cache(tmp_path):
    """A persistent compilation cache shared by the killed run and the in-process runs: the
    train step is compiled once (in the subprocess), not three times. Restored afterwards."""
    path = tmp_path / "jax_cache"
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {n: getattr(jax.config, n) for n in names}
    env = {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    for n, v in zip(names, (str(path), 0, 0)):
        jax.config.update(n, v)
    compilation_cache.reset_cache()
    try:
        yield env
    finally:
        for n, v in saved.items():
            jax.config.update(n, v)
        compilation_cache.reset_cache()


def _toml(root, out) -> str:
    # the same run as run_config(root, out, steps=STEPS, save_every=SAVE_EVERY)
    return (
        f'model = "{root / "model"}"\ndata = "{root / "data.jsonl"}"\n'
        f'image_folder = "{root / "images"}"\noutput_dir = "{out}"\n'
        'mesh = "data=-1"\nbatch_size = 8\nmax_length = 64\ndtype = "float32"\nnum_workers = 2\n'
        f"steps = {STEPS}\nsave_every = {SAVE_EVERY}\n"
        "[train]\nlearning_rate = 3e-3\nwarmup_steps = 2\n"
    )


def _logged_steps(out: Path) -> list[int]:
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]


def _save_in_flight(ckpt: Path) -> bool:
    """A temporary (not yet committed) step folder of a step >= 4 exists."""
    try:
        names = [p.name for p in ckpt.iterdir()]
    except FileNotFoundError:
        return False
    return any(TMP in n and n.split(".")[0].isdigit() and int(n.split(".")[0]) >= 4 for n in names)


def _kill_when(ready, workspace, tmp_path, out, env: dict[str, str], *, within: float, poll: float) -> None:
    """Starts `vipllava-train` on the run writing to `out` and SIGKILLs it once `ready()` holds
    (polled every `poll` s, for at most `within` s); it must still be running then."""
    config = tmp_path / "run.toml"
    config.write_text(_toml(workspace, out))
    command = [str(Path(sys.executable).with_name("vipllava-train")), "--config", str(config)]
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)
        try:
            deadline = time.monotonic() + within
            while time.monotonic() < deadline and proc.poll() is None and not ready():
                time.sleep(poll)
            assert proc.poll() is None, f"the run ended before it was killed:\n{(tmp_path / 'train.log').read_text()}"
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _kill_mid_run(workspace, tmp_path, out: Path, env: dict[str, str]) -> tuple[list[int], bool]:
    seen = {"in_flight": False}

    def ready():
        seen["in_flight"] = _save_in_flight(out / "checkpoints")
        return seen["in_flight"] or any(s >= KILL_AT for s in _logged_steps(out))

    _kill_when(ready, workspace, tmp_path, out, env, within=90, poll=0.002)
    return _logged_steps(out), seen["in_flight"]


def test_killed_run_resumes_from_its_last_complete_checkpoint(workspace, tmp_path, compile_cache):
    out = tmp_path / "killed"
    logged, in_flight = _kill_mid_run(workspace, tmp_path, out, compile_cache)
    assert logged and max(logged) < STEPS, logged

    # Only complete steps count: a save cut short stays a temporary folder, never a step.
    ckpt = out / "checkpoints"
    manager = ocp.CheckpointManager(ckpt.absolute())
    steps = list(manager.all_steps())
    latest = manager.latest_step()
    manager.close()
    assert latest is not None and latest == max(steps), (steps, sorted(p.name for p in ckpt.iterdir()))
    assert latest % SAVE_EVERY == 0 and latest <= max(logged), (latest, logged)
    for s in steps:
        assert (ckpt / str(s)).is_dir() and not any(TMP in p.name for p in (ckpt / str(s)).iterdir())
    unfinished = [p.name for p in ckpt.iterdir() if TMP in p.name]
    assert all(int(n.split(".")[0]) > latest for n in unfinished), (unfinished, latest)

    # The restarted run picks up after `latest` and reproduces the uninterrupted losses.
    rest = train(run_config(workspace, out, steps=STEPS, save_every=SAVE_EVERY), progress=False)
    full = train(run_config(workspace, tmp_path / "full", steps=STEPS, save_every=SAVE_EVERY),
                 progress=False)
    assert [m["step"] for m in rest] == list(range(latest + 1, STEPS + 1))
    expected = [m["loss"] for m in full[latest:]]
    got = [m["loss"] for m in rest]
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-6, (got, expected, in_flight)


def test_interrupted_run_saves_its_step_and_resumes(workspace, tmp_path, compile_cache):
    """SIGINT (Ctrl-C) to a real `python -m vipllava_jax.train.cli`: the step in progress
    completes and is saved (in flight saves too), one line, exit 130; the resume continues."""
    out = tmp_path / "interrupted"
    config = tmp_path / "run.toml"
    config.write_text(_toml(workspace, out))
    proc = subprocess.Popen([sys.executable, "-m", "vipllava_jax.train.cli", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **compile_cache})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not _logged_steps(out):
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    stopped = int(last.split("interrupted after step ")[1].split(";")[0])
    assert last.startswith(f"vipllava-train: interrupted after step {stopped}; saved checkpoint {stopped}"), last
    assert stopped < STEPS and _logged_steps(out) == list(range(1, stopped + 1))
    manager = ocp.CheckpointManager((out / "checkpoints").absolute())
    assert manager.latest_step() == stopped
    manager.close()

    rest = train(run_config(workspace, out, steps=STEPS, save_every=SAVE_EVERY), progress=False)
    assert [m["step"] for m in rest] == list(range(stopped + 1, STEPS + 1))


def test_killed_run_in_a_bucket_resumes_from_its_last_complete_checkpoint(workspace, tmp_path, compile_cache,
                                                                          gcs_bucket):
    """The same on a gs:// output_dir (the GCS emulator): Orbax writes a step in place there and
    commits it with a marker object; a step killed before its marker is not a checkpoint."""
    out = f"{gcs_bucket}/killed"
    ckpt = storage.path(out) / "checkpoints"
    # killed once step 4's save has begun (its objects appear before its marker)
    _kill_when((ckpt / "4").exists, workspace, tmp_path, out, compile_cache, within=120, poll=0.05)

    manager = ocp.CheckpointManager(storage.absolute(ckpt))
    latest = manager.latest_step()
    manager.close()
    assert latest in (2, 4), latest  # step 4 only if its marker landed before the kill

    rest = train(run_config(workspace, out, steps=STEPS, save_every=SAVE_EVERY), progress=False)
    full = train(run_config(workspace, tmp_path / "full", steps=STEPS, save_every=SAVE_EVERY), progress=False)
    assert [m["step"] for m in rest] == list(range(latest + 1, STEPS + 1))
    got, expected = [m["loss"] for m in rest], [m["loss"] for m in full[latest:]]
    assert max(abs(a - b) for a, b in zip(got, expected)) <= 1e-6, (got, expected)
    rows = [json.loads(line)["step"] for line in (storage.path(out) / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, STEPS + 1))

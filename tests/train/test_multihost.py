"""Several hosts through the command itself: two `vipllava-train` processes (4 CPU devices
each, gloo collectives) joined by the JAX_* environment train with the losses of one process
with 8 devices, across a stop and a resume; without the settings, a second trainer on the
same output folder is refused rather than training twice."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers.train import run_config
from vipllava_jax import storage
from vipllava_jax.train import train


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(cfg, path):
    """The run config as the TOML file the command reads."""
    def value(v):
        return json.dumps(v) if isinstance(v, (str, bool, int, float)) else json.dumps(list(v))

    top = {k: v for k, v in cfg.__dict__.items() if k != "train" and v is not None}
    lines = [f"{k} = {value(v).lower() if isinstance(v, bool) else value(v)}" for k, v in top.items()]
    lines.append("[train]")
    lines += [f"{k} = {value(v)}" for k, v in cfg.train.__dict__.items() if not isinstance(v, tuple)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _command(config, overrides, log, env):
    return subprocess.Popen(
        [sys.executable, "-m", "vipllava_jax.train.cli", "--config", str(config), *overrides],
        stdout=log, stderr=subprocess.STDOUT, env=env)


def _env(ndev, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={ndev}", JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONUNBUFFERED="1", **extra)
    return env


def _run_pair(tmp_path, config, overrides, tag, timeout=240):
    port = _free_port()
    procs = []
    for pid in range(2):
        log = open(tmp_path / f"{tag}_{pid}.log", "w")
        env = _env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append((_command(config, overrides, log, env), log))
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for pid, (p, _) in enumerate(procs):
        assert p.returncode == 0, (tag, pid, (tmp_path / f"{tag}_{pid}.log").read_text()[-4000:])
    return [(tmp_path / f"{tag}_{pid}.log").read_text() for pid in range(2)]


def test_two_hosts_through_the_command_give_the_losses_of_one(workspace, tmp_path, gcs_bucket):
    """fsdp=-1: the batch rows and every parameter are split over the 8 devices of both
    processes, so the step, the batch assembly and the checkpoint all cross processes.
    The pair stops after step 3 (saved at 2) and resumes: steps 3 and 4 run again from the
    checkpoint both wrote and give the uninterrupted run's losses. As on a TPU pod, the
    output folder is in a bucket (the GCS emulator), which both hosts write to."""
    import jax

    if jax.device_count() != 8:
        pytest.skip(f"the reference run needs 8 CPU devices in this process, got {jax.device_count()}")

    def cfg(out):
        return dataclasses.replace(run_config(workspace, out, steps=4, save_every=2), mesh="fsdp=-1", num_workers=1)

    multi = storage.path(f"{gcs_bucket}/multi")
    config = _toml(cfg(multi), tmp_path / "multi.toml")
    logs = _run_pair(tmp_path, config, ["stop_after=3"], "first")
    assert "process 0 of 2: 4 local of 8 devices" in logs[0] and "process 1 of 2" in logs[1], logs
    metrics = multi / "metrics.jsonl"
    first = [json.loads(line) for line in metrics.read_text().splitlines()]
    _run_pair(tmp_path, config, [], "resumed")
    one = [m["loss"] for m in train(cfg(tmp_path / "single"), progress=False)]

    # process 0 alone logs the metrics, one row a step: steps 1-3, then (resumed from the
    # checkpoint of step 2) step 3 again, replacing its row, and 4
    assert [r["step"] for r in first] == [1, 2, 3]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    losses = [r["loss"] for r in rows]
    assert losses[2] == first[2]["loss"], "the resumed step 3 repeats the lost one exactly"
    assert max(abs(a - b) for a, b in zip(losses, one)) < 1e-5, (losses, one)
    # one set of checkpoints, holding both hosts' data positions
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    data = json.loads((multi / "checkpoints" / "4" / "data" / "metadata").read_text())
    assert [h["process_index"] for h in data["hosts"]] == [0, 1]


def test_a_second_trainer_on_the_same_folder_is_refused(workspace, tmp_path):
    """Two hosts started without the settings would each train alone into one folder: the
    run lock refuses the second; once the first is killed, its stale lock does not block a
    resume."""
    config = _toml(dataclasses.replace(run_config(workspace, tmp_path / "run", steps=400, save_every=1000), num_workers=1),
                   tmp_path / "run.toml")
    lock = tmp_path / "run" / ".run.lock"
    with open(tmp_path / "a.log", "w") as log_a:
        first = _command(config, [], log_a, _env(1))
        try:
            deadline = time.time() + 120
            while not lock.exists() and first.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert lock.exists(), (tmp_path / "a.log").read_text()[-3000:]
            second = subprocess.run(
                [sys.executable, "-m", "vipllava_jax.train.cli", "--config", str(config)],
                capture_output=True, text=True, env=_env(1), timeout=120)
            assert second.returncode == 2, second.stderr[-3000:]
            assert f"is in use by process {first.pid}" in second.stderr
            assert "Traceback" not in second.stderr
        finally:
            first.kill()
            first.wait()
    assert lock.exists()  # left behind by the killed trainer
    resumed = subprocess.run(
        [sys.executable, "-m", "vipllava_jax.train.cli", "--config", str(config), "steps=3", "train.total_steps=3"],
        capture_output=True, text=True, env=_env(1), timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not lock.exists()


def test_one_line_errors_for_incomplete_or_unjoined_settings(workspace, tmp_path, monkeypatch):
    from vipllava_jax.train import TrainingError
    from vipllava_jax.train.hosts import check_joined, detected_cluster, explicit_settings

    with pytest.raises(TrainingError, match="missing: JAX_NUM_PROCESSES, JAX_PROCESS_ID"):
        explicit_settings({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert explicit_settings({"num_processes": 2, "process_id": 1, "coordinator_address": "h:1"}, {}) == {
        "coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == ("Cloud TPU", 4)
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) == ("SLURM", 2)
    assert detected_cluster({"TPU_WORKER_HOSTNAMES": "t0"}) is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1")
    with pytest.raises(TrainingError, match="expects 2 processes but joined 1: run the same vipllava-train"):
        check_joined(1)

"""Two processes (jax.distributed on 127.0.0.1, 4 CPU devices each, gloo collectives) train
with the losses of one process with 8 devices, across a stop and a resume from the checkpoint
both processes wrote."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from test_train_loop import run_config, workspace  # noqa: F401  (the fixture)

from vipllava_jax.train.loop import train

WORKER = textwrap.dedent('''
    import json, os, sys
    cfg_json, out, pid, nprocs, ndev, port, stop_after = sys.argv[1:8]
    pid, nprocs, stop_after = int(pid), int(nprocs), int(stop_after)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nprocs > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nprocs,
                                   process_id=pid, initialization_timeout=120)
    assert jax.process_count() == nprocs and jax.device_count() == 8, (jax.process_count(), jax.devices())
    import dataclasses
    from vipllava_jax.train import RunConfig, train
    cfg = RunConfig.from_dict(json.loads(cfg_json))
    history = []
    if stop_after:  # stop as if killed, then resume from the last complete checkpoint
        history += train(dataclasses.replace(cfg, stop_after=stop_after), progress=False)
    history += train(cfg, progress=False)
    with open(out, "w") as f:
        json.dump([m["loss"] for m in history], f)
    if nprocs > 1:
        jax.distributed.shutdown()
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, cfg, nprocs, ndev, port, tag, stop_after=0):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cfg_json = json.dumps(dataclasses.asdict(cfg))
    procs = []
    for pid in range(nprocs):
        log = open(tmp_path / f"{tag}_{pid}.log", "w")
        procs.append((subprocess.Popen(
            [sys.executable, str(script), cfg_json, str(tmp_path / f"{tag}_{pid}.json"),
             str(pid), str(nprocs), str(ndev), str(port), str(stop_after)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ), log))
    return procs


def _kill(procs):
    for p, log in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


def _wait(procs, tmp_path, tag, timeout):
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # killed below; the return codes then fail the test
    finally:
        _kill(procs)
    for pid, (p, _) in enumerate(procs):
        assert p.returncode == 0, (tag, pid, (tmp_path / f"{tag}_{pid}.log").read_text()[-4000:])
    return [json.loads((tmp_path / f"{tag}_{pid}.json").read_text()) for pid in range(len(procs))]


def test_two_processes_give_the_losses_of_one(workspace, tmp_path):  # noqa: F811
    """fsdp=-1: the batch rows and every parameter are split over the 8 devices of both
    processes, so the step, the batch assembly and the checkpoint all cross processes.
    The pair stops after step 3 (saved at 2) and resumes: steps 3 and 4 run again from the
    checkpoint both wrote and give the uninterrupted run's losses."""
    import jax

    if jax.device_count() != 8:
        pytest.skip(f"the reference run needs 8 CPU devices in this process, got {jax.device_count()}")

    def cfg(out):
        return dataclasses.replace(run_config(workspace, out, steps=4, save_every=2),
                                   mesh="fsdp=-1", batch_size=8)

    multi = _launch(tmp_path, cfg(tmp_path / "multi"), 2, 4, _free_port(), "multi", stop_after=3)
    try:  # the one-process reference runs here (8 devices, conftest) while the pair runs
        one = [m["loss"] for m in train(cfg(tmp_path / "single"), progress=False)]
    except BaseException:
        _kill(multi)
        raise
    both = _wait(multi, tmp_path, "multi", 240)
    assert len(one) == 4
    assert both[0] == both[1]
    assert len(both[0]) == 3 + 2  # steps 1-3, then 3-4 after the resume from step 2
    resumed = both[0][:3] + both[0][4:]
    assert both[0][3] == both[0][2], "the resumed step 3 repeats the lost one exactly"
    assert max(abs(a - b) for a, b in zip(resumed, one)) < 1e-5, (both[0], one)
    # process 0 alone logs the metrics, and the checkpoint holds both hosts' data positions
    lines = (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 3, 4]
    data = json.loads(next((tmp_path / "multi" / "checkpoints" / "4").glob("data*/*")).read_text())
    assert [h["process_index"] for h in data["hosts"]] == [0, 1]

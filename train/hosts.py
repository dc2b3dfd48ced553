"""A run's place among hosts: joining the other processes of a multi-host job before any
device is touched, saying the topology, and one writer per output folder (a run lock).

A pod slice or a multi-node job runs the same command on every host. `join_hosts` calls
`jax.distributed.initialize` when the environment says this process is one of several:

    explicit   coordinator_address / num_processes / process_id in the run config, or the
               JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment
    detected   Cloud TPU pod slices, SLURM and Open MPI jobs: jax's own cluster detection

and does nothing on one host.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax

from vipllava_jax import storage
from vipllava_jax.train.config import TrainingError

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
LOCK = ".run.lock"


def explicit_settings(config: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> dict | None:
    """coordinator_address, num_processes, process_id from the run config (first) or the
    environment; None when neither names any of them."""
    settings = {k: config.get(k) if config.get(k) is not None else environ.get(env) for k, env in ENV.items()}
    given = {k: v for k, v in settings.items() if v not in (None, "")}
    if not given:
        return None
    missing = [ENV[k] for k in ENV if k not in given]
    if missing:
        raise TrainingError(f"a multi-host run needs all of {', '.join(ENV.values())} (or the run config's "
                            f"{', '.join(ENV)}); missing: {', '.join(missing)}")
    try:
        n, i = int(given["num_processes"]), int(given["process_id"])
    except ValueError:
        raise TrainingError(f"num_processes and process_id must be integers, got {given['num_processes']!r}, "
                            f"{given['process_id']!r}") from None
    if n < 1 or not 0 <= i < n:
        raise TrainingError(f"need num_processes >= 1 and 0 <= process_id < num_processes, got {n} and {i}")
    return {"coordinator_address": str(given["coordinator_address"]), "num_processes": n, "process_id": i}


def detected_cluster(environ: Mapping[str, str] = os.environ) -> tuple[str, int] | None:
    """(kind, hosts) when the environment is one process of a multi-process job that jax's
    cluster detection knows; None on one host."""

    def count(name: str) -> int:
        try:
            return int(environ.get(name, "1"))
        except ValueError:
            return 1

    tpu_hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(tpu_hosts) > 1:
        return "Cloud TPU", len(tpu_hosts)
    if "SLURM_JOB_ID" in environ and count("SLURM_NTASKS") > 1:
        return "SLURM", count("SLURM_NTASKS")
    if count("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI", count("OMPI_COMM_WORLD_SIZE")
    return None


def join_hosts(config: Mapping[str, object] | None = None) -> int:
    """Joins the job's other processes if there are any; returns the number of processes
    expected (1 on one host). Call before anything touches a device."""
    settings = explicit_settings(config or {})
    cluster = detected_cluster()
    expected = settings["num_processes"] if settings else cluster[1] if cluster else 1
    if expected > 1 and not jax.distributed.is_initialized():
        try:
            jax.distributed.initialize(**(settings or {}))
        except (RuntimeError, ValueError) as e:  # an unreachable coordinator, a bad address
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"could not join the other {expected - 1} processes: {first}") from None
    return expected


def check_joined(expected: int) -> None:
    """One line, before any step, when this process should have joined others but has not:
    it would train alone on its local devices, sure it is the whole job."""
    cluster = detected_cluster()
    want = max(expected, cluster[1] if cluster else 1)
    if jax.process_count() < want:
        how = (f"set {', '.join(ENV.values())} on each host" if cluster is None
               else f"run the same vipllava-train command on all {want} hosts of the {cluster[0]} job")
        raise TrainingError(f"this run expects {want} processes but joined {jax.process_count()}: {how}")


def topology(mesh, batch_size: int) -> str:
    """The first lines of a run: processes, this one, devices, the mesh, the batch per host."""
    hosts = jax.process_count()
    axes = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return (f"process {jax.process_index()} of {hosts}: {jax.local_device_count()} local of "
            f"{jax.device_count()} devices ({jax.devices()[0].platform}); mesh {axes}; "
            f"batch {batch_size} = {batch_size // hosts} rows per host")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextlib.contextmanager
def run_lock(output_dir: str | Path) -> Iterator[None]:
    """One trainer per output folder: the primary process holds `output_dir/.run.lock`
    (pid, host, start time) while it runs. A lock left by a process that is gone (same host,
    pid not running) is taken over, so a killed run resumes; a live holder is a one-line error.

    One code path for a local folder and a gs:// bucket: the lock is created only if absent
    (O_EXCL; a GCS generation precondition), a stale one is deleted only if it is still the
    version judged stale (so of two processes taking it over at once, one wins), and release
    deletes it only if it is still this process's."""
    if jax.process_index() != 0:  # one writer per job: process 0 holds it for all
        yield
        return
    path = storage.path(output_dir) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    mine = json.dumps(me)
    for _ in range(3):
        if storage.create_exclusive(path, mine):
            break
        seen = storage.read_versioned(path)
        if seen is None:  # released meanwhile
            continue
        text, version = seen
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"])
        if stale or not holder:
            storage.delete_if_version(path, version)  # False: another process took it over first
            continue
        raise TrainingError(
            f"{output_dir} is in use by process {holder.get('pid')} on {holder.get('host')} "
            f"(since {holder.get('started')}); one trainer per output_dir (remove {path} if that "
            "process is gone)")
    else:
        raise TrainingError(f"could not take the run lock {path}")
    try:
        yield
    finally:
        try:
            seen = storage.read_versioned(path)
            if seen is not None and seen[0] == mine:
                storage.delete_if_version(path, seen[1])
        except Exception as e:  # noqa: BLE001 - a failed release must not hide how the run ended
            # left behind, it names a process gone: the next run on this host takes it over
            print(f"could not release the run lock {path}: {type(e).__name__}: {e}", file=sys.stderr)

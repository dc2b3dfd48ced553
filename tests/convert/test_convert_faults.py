"""Faults around the converter: damaged Orbax folders, a disk that fills up, a converter
killed mid-write, two converters racing to one destination."""

import os
import resource
import signal
import subprocess
import sys
import time

import pytest

from vipllava_jax.checkpoint import atomic_output
from vipllava_jax.convert import hf_to_orbax
from vipllava_jax.convert.cli import main
from vipllava_jax.errors import CheckpointError


@pytest.fixture(scope="module")
def orbax_folder(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("orbax") / "model"
    hf_to_orbax(tiny_hf[1], out)
    return out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vipllava-convert: error: "), err
    return err[0]


def test_truncated_chunk_and_missing_metadata_are_one_line(orbax_folder, tmp_path, capsys):
    import shutil

    damaged = tmp_path / "truncated"
    shutil.copytree(orbax_folder, damaged)
    chunks = [p for p in (damaged / "params").rglob("*") if p.is_file()]
    biggest = max(chunks, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:10])
    assert main(["orbax-to-hf", str(damaged), str(tmp_path / "out1")]) == 2
    assert "damaged Orbax checkpoint" in one_error_line(capsys)

    no_meta = tmp_path / "no_metadata"
    shutil.copytree(orbax_folder, no_meta)
    (no_meta / "params" / "_METADATA").unlink()
    assert main(["orbax-to-hf", str(no_meta), str(tmp_path / "out2")]) == 2
    assert "params" in one_error_line(capsys)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_disk_full_during_hf_to_orbax_is_one_line(tiny_hf, tmp_path):
    """A real failing write: the converter runs with a file size limit (RLIMIT_FSIZE) smaller
    than its largest tensor chunk, as on a full disk, and SIGXFSZ ignored so writes fail."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    dst = tmp_path / "out" / "orbax"
    dst.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "vipllava_jax.convert", "hf-to-orbax", str(tiny_hf[1]), str(dst)],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert proc.returncode == 2, proc.stderr
    # Orbax's writer threads may print "Event loop is closed" tracebacks of their own at exit
    # (around our line, in any order); our error is one line naming the failed write.
    ours = [line for line in proc.stderr.splitlines() if line.startswith("vipllava-convert: error:")]
    assert len(ours) == 1 and ours[0].startswith("vipllava-convert: error: cannot write"), proc.stderr
    assert ours[0].endswith("File too large"), ours[0]
    assert os.listdir(dst.parent) == []  # neither DST nor its temporary folder


def test_temporary_folder_of_a_killed_converter_is_cleaned(tiny_hf, tmp_path, capsys):
    dst = tmp_path / "orbax"
    proc = subprocess.Popen([sys.executable, "-m", "vipllava_jax.convert", "hf-to-orbax", str(tiny_hf[1]), str(dst)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".orbax.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not tmp.exists():
        pytest.skip("the converter finished before it could be killed")
    assert not dst.exists()
    assert main(["hf-to-orbax", str(tiny_hf[1]), str(dst)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["orbax"]  # the stale folder is gone


def test_racing_writers_do_not_both_succeed(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="written by another process meanwhile"):
        with atomic_output(dst) as tmp:
            (tmp / "mine").write_text("mine")
            dst.mkdir()  # the other converter finished first
            (dst / "theirs").write_text("theirs")
    assert sorted(p.name for p in dst.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dangling_symlink_destination(tmp_path):
    dst = tmp_path / "link"
    dst.symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="dangling symbolic link"):
        with atomic_output(dst):
            pass
    with atomic_output(dst, overwrite=True) as tmp:
        (tmp / "x").write_text("x")
    assert (dst / "x").read_text() == "x" and not dst.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]

"""Faults around a training run's checkpoints: a copied or moved run, a damaged latest
checkpoint, a resume that logs its steps again."""

import json
import shutil

import numpy as np
import pytest

from tests.helpers.train import run_config
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration as JaxModel
from vipllava_jax.train import TrainingError, export_trained_model, load_trained_model, train

IDS = np.array([[1] + [100] * 4 + [5, 6, 7, 8]])
PIXELS = np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype(np.float32)


def truncate_tensor_data(folder):
    """Cuts the tensor data under `folder` to half: every OCDBT data file (in a `d/` folder),
    else the biggest file. (The biggest file alone may hold no tensor the restore reads.)"""
    files = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    files = files or [max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)]
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[:len(data) // 2])
    return files[0]


def logits(model):
    return np.asarray(model(IDS, PIXELS).logits)


def test_copied_moved_and_damaged_runs(workspace, tmp_path):
    run, copy, moved = tmp_path / "run", tmp_path / "copy", tmp_path / "moved"
    train(run_config(workspace, run, steps=2, save_every=1, train=dict(learning_rate=1e-2)), progress=False)
    step2 = logits(load_trained_model(run))
    assert not np.array_equal(step2, logits(load_trained_model(run, step=1)))
    shutil.copytree(run, copy)

    # The original's latest checkpoint is damaged: the copy reads its own checkpoints.
    truncate_tensor_data(run / "checkpoints" / "2")
    np.testing.assert_array_equal(logits(load_trained_model(copy)), step2)
    with pytest.raises(TrainingError, match=r"checkpoint 2 in .* does not restore") as e:
        load_trained_model(run)
    assert "\n" not in str(e.value)

    # A moved run exports, and the folder it was first written to is not recreated.
    copy.rename(moved)
    exported = export_trained_model(moved, tmp_path / "exported")
    np.testing.assert_array_equal(logits(JaxModel.from_pretrained(exported)), step2)
    assert not copy.exists()

    # Resume skips the damaged checkpoint (set aside), starts after step 1, and metrics.jsonl
    # keeps one row per step.
    history = train(run_config(workspace, run, steps=3, save_every=1, train=dict(learning_rate=1e-2)),
                    progress=False)
    assert [m["step"] for m in history] == [2, 3]
    assert (run / "checkpoints.damaged" / "2").is_dir()
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]


@pytest.mark.parametrize("text, message", [
    ("steps = [", "invalid TOML"),
    ("save_every = 0", "save_every must be >= 1, got 0"),
    ("seed = 1180591620717411303424", "seed must be in [0, 2**32)"),
    ("[train]\nlearning_rate = -1", "learning_rate must be a finite number > 0, got -1"),
    ("[train]\nlearning_rate = \"abc\"", "learning_rate must be a float, got 'abc'"),
    ("batch_size = 2.5", "batch_size must be an int, got 2.5"),
    ("steps = 100\n[train]\nwarmup_steps = 150", "warmup_steps (150) is longer than the schedule's total_steps (100"),
    ("mesh = \"data=4096\"", "axis sizes multiply to 4096, but there are"),
])
def test_bad_run_configs_are_one_line_errors(tmp_path, capsys, text, message):
    from vipllava_jax.train.cli import main

    config = tmp_path / "run.toml"
    config.write_text(f'model = "{tmp_path}"\ndata = "{tmp_path / "d.jsonl"}"\n'
                      f'output_dir = "{tmp_path / "out"}"\n' + text + "\n")
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vipllava-train: error: "), err
    assert message in err[0], err[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()

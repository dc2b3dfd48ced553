"""The training run end to end: overfit, export to transformers, exact resume, NaN stop."""

import json
import re
import struct

import jax
import numpy as np
import pytest
import torch

from tests.helpers.train import run_config
from vipllava_jax.convert import orbax_to_hf
from vipllava_jax.models.vipllava.modeling import VipLlavaForConditionalGeneration as JaxModel
from vipllava_jax.train import (
    RunConfig,
    TrainingError,
    export_trained_model,
    load_trained_model,
    train,
)


def test_tiny_model_overfits_and_exports_to_transformers(workspace, tmp_path):
    from transformers import VipLlavaForConditionalGeneration

    history = train(run_config(workspace, tmp_path / "run", steps=25, save_every=25,
                               train=dict(learning_rate=1e-2)), progress=False)
    losses = [m["loss"] for m in history]
    assert losses[-1] < 0.3 * losses[0], losses
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 25

    orbax_to_hf(tmp_path / "run", tmp_path / "hf_out")
    assert not {"metrics.jsonl", "run_config.json"} & {f.name for f in (tmp_path / "hf_out").iterdir()}
    ref, info = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "hf_out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    trained = load_trained_model(tmp_path / "run")
    ids = np.array([[1] + [100] * 4 + [5, 6, 7, 8]])
    pixels = np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = ref.eval()(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    np.testing.assert_allclose(np.asarray(trained(ids, pixels).logits), expected, atol=1e-4)

    exported = export_trained_model(tmp_path / "run", tmp_path / "exported")
    assert (exported / "tokenizer.json").read_bytes() == (workspace / "model" / "tokenizer.json").read_bytes()
    np.testing.assert_array_equal(np.asarray(JaxModel.from_pretrained(exported)(ids, pixels).logits),
                                  np.asarray(trained(ids, pixels).logits))


def test_resumed_run_gives_the_losses_of_an_uninterrupted_one(workspace, tmp_path):
    full = train(run_config(workspace, tmp_path / "a", steps=6, save_every=2), progress=False)
    first = train(run_config(workspace, tmp_path / "b", steps=6, save_every=2, stop_after=3), progress=False)
    assert [m["step"] for m in first] == [1, 2, 3]
    # step 3 was never saved: the resumed run starts again after step 2
    rest = train(run_config(workspace, tmp_path / "b", steps=6, save_every=2), progress=False)
    assert [m["step"] for m in rest] == [3, 4, 5, 6]
    assert [m["loss"] for m in rest] == [m["loss"] for m in full[2:]]


def test_non_finite_loss_stops_and_keeps_a_checkpoint_that_resumes(workspace, tmp_path):
    cfg = run_config(workspace, tmp_path / "nan", steps=6, save_every=1,
                     train=dict(max_grad_norm=1e30))
    cfg = RunConfig.from_dict({**json.loads(json.dumps(cfg.__dict__, default=lambda o: o.__dict__)),
                               "train": {**cfg.train.__dict__, "learning_rate": 1e30}})
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) .* at step (\d+); .* last good checkpoint is step") as e:
        train(cfg, progress=False)
    message = str(e.value)
    assert "\n" not in message
    bad_step = int(re.search(r"at step (\d+)", message).group(1))
    good = int(re.search(r"last good checkpoint is step (\d+)", message).group(1))
    assert good < bad_step - 1, message  # the step before the non-finite loss is not vouched for
    # the checkpoint whose parameters gave the non-finite loss is set aside, not resumed from
    assert (tmp_path / "nan" / "checkpoints.nonfinite" / str(bad_step - 1)).is_dir()
    saved = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == good, (saved, good)
    # the reported checkpoint resumes with a sane rate
    history = train(run_config(workspace, tmp_path / "nan", steps=good + 2, save_every=1), progress=False)
    assert [m["step"] for m in history] == [good + 1, good + 2]
    assert all(np.isfinite(m["loss"]) for m in history)


def test_command_reads_a_toml_config_with_overrides(workspace, tmp_path, capsys):
    from vipllava_jax.train.cli import main

    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{workspace / "model"}"\ndata = "{workspace / "data.jsonl"}"\n'
        f'image_folder = "{workspace / "images"}"\noutput_dir = "{tmp_path / "cli"}"\n'
        'mesh = "data=-1"\nbatch_size = 8\nmax_length = 64\ndtype = "float32"\nsteps = 100\n'
        'peak_tflops = 0.5\n[train]\nlearning_rate = 1e-3\n'
    )
    assert main(["--config", str(config), "steps=2", "save_every=2", "train.total_steps=2"]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:  # MFU = model FLOP/s over the peak of all devices
        assert m["mfu"] == pytest.approx(m["model_tflops"] / (0.5 * jax.device_count()))
        assert m["tokens_per_s"] == pytest.approx(8 * 64 / m["seconds"])
    board = tensorboard_scalars(tmp_path / "cli" / "tensorboard")
    assert board["train/loss"] == [(m["step"], pytest.approx(m["loss"])) for m in metrics]
    assert {"train/learning_rate", "train/grad_norm", "train/mfu", "train/tokens_per_s"} <= set(board)

    assert main(["--config", str(config), "bogus_key=1"]) == 2
    assert "unknown config keys: ['bogus_key']" in capsys.readouterr().err
    assert main(["--config", str(config), "train.stage=lora", "train.lora_targets=['wq']"]) == 2
    assert "LoRA targets must be" in capsys.readouterr().err


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every event file in `folder` (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_lora_run_exports_merged_weights_to_transformers(workspace, tmp_path):
    from transformers import VipLlavaForConditionalGeneration

    history = train(run_config(workspace, tmp_path / "lora", steps=4, save_every=4, train=dict(
        stage="lora", lora_rank=4, lora_alpha=8.0, learning_rate=1e-2)), progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    orbax_to_hf(tmp_path / "lora", tmp_path / "hf_lora")
    ref = VipLlavaForConditionalGeneration.from_pretrained(tmp_path / "hf_lora").eval()
    base = VipLlavaForConditionalGeneration.from_pretrained(workspace / "hf").eval()
    trained = load_trained_model(tmp_path / "lora")
    ids = np.array([[1] + [100] * 4 + [5, 6, 7, 8]])
    pixels = np.random.default_rng(1).standard_normal((1, 3, 28, 28)).astype(np.float32)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
        untrained = base(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    np.testing.assert_allclose(np.asarray(trained(ids, pixels).logits), expected, atol=1e-4)
    assert np.abs(expected - untrained).max() > 1e-3  # the adapters were merged in

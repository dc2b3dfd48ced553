"""The training run's config over the `workspace` fixture (tests/train/conftest.py)."""

from vipllava_jax.train import RunConfig


def run_config(root, out, **kw):
    train_kw = kw.pop("train", {})
    return RunConfig.from_dict(dict(
        model=str(root / "model"), data=str(root / "data.jsonl"), image_folder=str(root / "images"),
        output_dir=str(out), mesh="data=-1", batch_size=8, max_length=64, dtype="float32",
        num_workers=2, **kw,
        train=dict(**{"learning_rate": 3e-3, "warmup_steps": 2, **train_kw}),
    ))

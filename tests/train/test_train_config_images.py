"""The run config's image preprocessing: ViP-LLaVA's stages 2-3 pad images to a square of the
mean colour (`image_aspect_ratio pad`) before CLIP's resize + crop."""

import pytest

from tests.helpers.train import run_config
from vipllava_jax.train import TrainingError
from vipllava_jax.train.loop import data_loader


@pytest.mark.parametrize(("value", "pads"), [(None, True), ("pad", True), ("crop", False)])
def test_image_aspect_ratio_reaches_the_loader_processor(workspace, tmp_path, value, pads):
    kw = {} if value is None else {"image_aspect_ratio": value}
    cfg = run_config(workspace, tmp_path / "run", **kw)
    loader = data_loader(cfg, None, batch_size=2)
    assert loader.processor.image_processor.pad_to_square is pads


def test_unknown_image_aspect_ratio_is_one_line(workspace, tmp_path):
    with pytest.raises(TrainingError, match="image_aspect_ratio must be 'pad' or 'crop'") as e:
        run_config(workspace, tmp_path / "run", image_aspect_ratio="square")
    assert "\n" not in str(e.value)

"""Fixtures of the conversion tests."""

import pytest

from tests.helpers import make_hf_model, make_inputs, save_hf_model, torch_forward
from tests.helpers.convert import add_side_files
from tests.helpers.original import make_original


@pytest.fixture(scope="session")
def original(tmp_path_factory):
    """(transformers model with the grown vocabulary, folder in the original layout)."""
    return make_original(tmp_path_factory.mktemp("original"))


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """(transformers model, HF folder with side files, inputs, reference logits)."""
    model = make_hf_model(seed=1)
    src = add_side_files(save_hf_model(model, tmp_path_factory.mktemp("untied") / "hf"))
    inputs = make_inputs(model.config)
    return model, src, inputs, torch_forward(model, inputs)[0]

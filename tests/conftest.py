"""Session setup and the fixtures shared across test folders.

The environment is set before anything imports jax: 8 host CPU devices for the mesh tests.
Helper functions live in `tests.helpers` (import them from there); the names re-exported
below keep `from conftest import ...` working in the test files at this folder's top level
(test_fused_attention, test_pallas_attention, test_train_step) until they switch.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.helpers import (  # noqa: E402, F401  (re-exported for `from conftest import ...`)
    IMAGE_TOKEN,
    VOCAB,
    assert_grads_match,
    jaxpr_eqns,
    make_hf_model,
    make_inputs,
    make_word_tokenizer,
    matmul_flops,
    save_hf_model,
    tiny_config,
    torch_forward,
    torch_loss_and_grads,
    traced_and_estimated_flops,
)
from tests.helpers.ved import SHAPES, make_hf_ved  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(transformers model, folder) for the default tiny shape, saved by save_pretrained."""
    model = make_hf_model()
    path = tmp_path_factory.mktemp("tiny_hf")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="session")
def hf_veds(tmp_path_factory):
    """name -> (transformers model, folder written by its save_pretrained), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            model = make_hf_ved(*SHAPES[name])
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return get

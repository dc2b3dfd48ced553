"""Session setup and the fixtures shared across test folders.

The environment is set before anything imports jax: 8 host CPU devices for the mesh tests.
Helper functions live in `tests.helpers` (import them from there).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from tests.helpers import make_hf_model  # noqa: E402
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


@pytest.fixture(scope="session")
def gcs():
    """A running in-memory GCS emulator (tests.helpers.gcs.GcsEmulator); the process env points
    tensorstore/Orbax, gcsfs/epath and google-cloud-storage at it for the rest of the session."""
    from tests.helpers.gcs import GcsEmulator

    with GcsEmulator() as emulator:
        yield emulator


@pytest.fixture
def gcs_bucket(gcs):
    """A fresh, empty bucket on the emulator, as "gs://<unique-name>"."""
    return gcs.bucket()

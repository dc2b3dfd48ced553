"""Fixtures of the conversion tests."""

import pytest

from tests.helpers.original import make_original


@pytest.fixture(scope="session")
def original(tmp_path_factory):
    """(transformers model with the grown vocabulary, folder in the original layout)."""
    return make_original(tmp_path_factory.mktemp("original"))

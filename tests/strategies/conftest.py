"""Fixtures shared by the method tests."""

import pytest

from clbench.runner import create_scenario


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def scenario():
    """3 experiences x 2 classes of 3x32x32 images: the CNN-sized tiny configuration."""
    return create_scenario("synthetic32-3")

"""Fixtures shared by the method tests."""

import pytest
import torch

from clbench.runner import create_scenario


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # on a 2-core machine, two intra-op threads per convolution thrash under any other load
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scenario():
    """3 experiences x 2 classes of 3x32x32 images: the CNN-sized tiny configuration."""
    return create_scenario("synthetic32-3")

"""Loss tests run single-threaded: the test machine is shared."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """The test machine is shared: keep torch to one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Set-up of the op tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Run every op test on one CPU thread: their tensors are small, and two threads on a two-core
    machine with anything else running spin more than they compute (about 3x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

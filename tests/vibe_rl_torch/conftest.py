"""Fixtures of the Torch backend tests."""

import pytest
import torch


@pytest.fixture
def deterministic():
    """Deterministic kernels on one thread: resumed runs must match bit for bit."""
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)

"""The training tests run tiny models: one thread is faster than two for such small tensors, and it keeps
them fast when other processes share the cores (OpenMP threads then wait on each other)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Optimizer tests run on one intra-op thread: deterministic reductions, no thrashing on a shared CPU."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

import pytest
import torch

from tests.loram.loram_models import token_batch as _token_batch


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread; on a shared machine, more threads only contend. Restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def token_batch() -> torch.Tensor:
    return _token_batch()

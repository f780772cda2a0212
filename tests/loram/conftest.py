import pytest
import torch

from tests.loram.loram_models import token_batch as _token_batch


@pytest.fixture
def token_batch() -> torch.Tensor:
    return _token_batch()

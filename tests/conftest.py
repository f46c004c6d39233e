import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models run fastest and steadiest on one thread (2 shared cores)."""
    torch.set_num_threads(1)
    yield

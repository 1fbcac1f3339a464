import pytest
import torch

from toolkit import BACKENDS


@pytest.fixture(params=BACKENDS, ids=str)
def backend(request):
    return request.param


@pytest.fixture(autouse=True)
def _seeded():
    # Fresh but reproducible random inputs for every test.
    torch.manual_seed(1234)
    yield


@pytest.fixture
def one_thread():
    # Tiny tensors gain nothing from threads, and on a busy machine OpenMP threads
    # competing with other processes make each tiny run ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

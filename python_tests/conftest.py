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


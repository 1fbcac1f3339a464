import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from toolkit import BACKENDS

# Hypothesis profiles (test_op_fuzz.py). "ci", the default: a fixed sequence of cases
# (derandomize), the same on every machine and every run, so that a failure in CI is a
# failure on the developer's machine too. "long": fresh random cases, 20 times as many;
# run it locally after touching a kernel:
#     HYPOTHESIS_PROFILE=long python -m pytest python_tests/test_op_fuzz.py
# Neither writes an example database: a case found by "long" is kept by adding it as an
# @example, not by a file in the checkout.
_FUZZ = dict(deadline=None, database=None, print_blob=True,
             # The fuzz tests draw their own inputs; the backend fixture holds no state.
             suppress_health_check=[HealthCheck.function_scoped_fixture,
                                    HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", derandomize=True, max_examples=1000, **_FUZZ)
settings.register_profile("long", derandomize=False, max_examples=20000, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(params=BACKENDS, ids=str)
def backend(request):
    with request.param.active() as backend:
        yield backend


@pytest.fixture(autouse=True)
def _full_fp32_convs():
    # cuDNN runs fp32 convs in TF32 by default (torch.backends.cudnn.allow_tf32), as
    # nn.Conv2d does; the float32 tolerances of the reference checks are those of full
    # fp32. test_cuda_backend.py checks the TF32 default on its own.
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = allowed


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

import pyro
import pytest
import torch

# The tests work on small tensors, where a second thread only adds synchronisation and, on a
# busy machine, long waits for a descheduled thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def float64_clean_param_store_and_seed():
    """Every test starts in float64, with an empty param store and a fixed seed."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    torch.set_default_dtype(default_dtype)
    pyro.clear_param_store()


def requires_cuda(test):
    return pytest.mark.cuda(
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test)
    )

"""Doctest set-up for ``pytest --doctest-modules pyro_masked``.

Every ``Example::`` in a docstring runs as a doctest with ``torch``, ``pyro`` and
``pyro.distributions as dist`` already imported, a fixed seed, an empty param store and
single-threaded torch, so that its printed outputs are reproducible. (The unit tests in
``tests/`` have their own ``tests/conftest.py``.)
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from _pytest.doctest import DoctestItem


@pytest.fixture(autouse=True)
def doctest_environment(request, doctest_namespace):
    if not isinstance(request.node, DoctestItem):
        yield
        return
    doctest_namespace.update(torch=torch, pyro=pyro, dist=dist)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)

import gpytorch
import numpy as np
import torch
from conftest import requires_cuda

from pyro_masked.local import LocalMaskedObjective, NeighborIndex, local_predict


@requires_cuda
def test_neighbor_lists_on_cuda_match_the_cpu_tree():
    X = torch.rand(2000, 3, generator=torch.Generator().manual_seed(0))
    on_cuda = NeighborIndex(X.cuda(), block_size=512)
    assert on_cuda.backend == "torch"
    np.testing.assert_array_equal(on_cuda.neighbor_lists(9), NeighborIndex(X).neighbor_lists(9))


@requires_cuda
def test_local_score_and_prediction_on_cuda_match_the_cpu():
    generator = torch.Generator().manual_seed(1)
    X = torch.rand(500, 2, generator=generator)
    y = torch.sin(6 * X).sum(-1) + 0.1 * torch.randn(500, generator=generator)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))
    objective = LocalMaskedObjective(X, 8)
    batch = objective.sample(64, np.random.default_rng(0))
    cpu = objective.log_predictive(kernel, X, y, torch.tensor(0.05), batch)
    cuda_objective = LocalMaskedObjective(X.cuda(), 8)
    gpu = cuda_objective.log_predictive(
        kernel.cuda(), X.cuda(), y.cuda(), torch.tensor(0.05, device="cuda"), batch
    )
    torch.testing.assert_close(gpu.cpu(), cpu)
    with torch.no_grad():
        want = local_predict(kernel.cpu(), X, y, X[:20] + 0.01, 0.05, 8)
        got = local_predict(kernel.cuda(), X.cuda(), y.cuda(), X[:20].cuda() + 0.01, 0.05, 8)
    torch.testing.assert_close(got.mean.cpu(), want.mean)
    torch.testing.assert_close(got.variance.cpu(), want.variance)

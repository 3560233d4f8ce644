import gpytorch
import pytest
import torch

from pyro_masked.local import NeighborIndex, local_predict


def exact_predictive(kernel, X, y, Xnew, noise, mean):
    covariance = kernel(X).to_dense() + noise * torch.eye(X.shape[0])
    cross = kernel(Xnew, X).to_dense()
    gain = torch.linalg.solve(covariance, cross.T).T
    predictive_mean = mean(Xnew) + gain @ (y - mean(X))
    variance = kernel(Xnew, diag=True) - (gain * cross).sum(-1)
    return predictive_mean, variance


@pytest.mark.parametrize("noiseless", [True, False])
def test_prediction_from_every_training_point_is_the_exact_gp_predictive(noiseless):
    generator = torch.Generator().manual_seed(0)
    X = torch.rand(30, 2, generator=generator)
    y = torch.sin(6 * X).sum(-1) + 0.1 * torch.randn(30, generator=generator)
    Xnew = torch.rand(11, 2, generator=generator)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))
    kernel.base_kernel.lengthscale = torch.tensor([0.3, 0.5])
    mean = gpytorch.means.ConstantMean()
    mean.constant.data.fill_(0.4)
    noise = 0.02
    with torch.no_grad():
        got = local_predict(kernel, X, y, Xnew, noise, 30, mean, noiseless, chunk_size=4)
        want_mean, want_var = exact_predictive(kernel, X, y, Xnew, noise, mean)
    torch.testing.assert_close(got.mean, want_mean)
    torch.testing.assert_close(got.variance, want_var + (0 if noiseless else noise))


def test_prediction_uses_the_nearest_training_points():
    generator = torch.Generator().manual_seed(1)
    X = torch.rand(200, 1, generator=generator)
    y = torch.sin(8 * X[:, 0])
    Xnew = torch.rand(20, 1, generator=generator)
    kernel = gpytorch.kernels.RBFKernel()
    kernel.lengthscale = 0.1
    index = NeighborIndex(X)
    with torch.no_grad():
        got = local_predict(kernel, X, y, Xnew, 1e-4, 10, index=index)
        nearest = index.query(Xnew, 10)
        for row in range(20):
            subset = torch.as_tensor(nearest[row])
            want, _ = exact_predictive(
                kernel, X[subset], y[subset], Xnew[row : row + 1], 1e-4, lambda x: x[:, 0] * 0
            )
            torch.testing.assert_close(got.mean[row : row + 1], want)
    assert (got.mean - torch.sin(8 * Xnew[:, 0])).abs().max() < 1e-2


def test_prediction_bad_inputs_are_named():
    X, y = torch.rand(10, 2), torch.rand(10)
    kernel = gpytorch.kernels.RBFKernel()
    with pytest.raises(ValueError, match="context_size=11 exceeds the 10 training points"):
        local_predict(kernel, X, y, torch.rand(3, 2), 0.1, 11)
    with pytest.raises(ValueError, match="Xnew has 3 input dimensions but X has 2"):
        local_predict(kernel, X, y, torch.rand(3, 3), 0.1, 4)
    with pytest.raises(ValueError, match="noisy predictions need one noise variance"):
        local_predict(kernel, X, y, torch.rand(3, 2), torch.ones(10), 4, noiseless=False)

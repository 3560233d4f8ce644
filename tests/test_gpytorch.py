import logging
import math

import gpytorch
import pytest
import torch
from conftest import requires_cuda

from pyro_masked import masked_log_prob
from pyro_masked.gpytorch import MaskedMarginalLogLikelihood


class ExactGPModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood, batch_shape=torch.Size(), priors=False):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch_shape)
        lengthscale_prior = gpytorch.priors.GammaPrior(2.0, 2.0) if priors else None
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(
                batch_shape=batch_shape, lengthscale_prior=lengthscale_prior
            ),
            batch_shape=batch_shape,
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def make_data(num_points, batch_shape=torch.Size(), seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch_shape, num_points, 1, generator=generator, dtype=dtype) * 4
    y = torch.sin(3 * x[..., 0]) + 0.3 * torch.randn(
        *batch_shape, num_points, generator=generator, dtype=dtype
    )
    return x, y


def gaussian_setup(num_points=6, batch_shape=torch.Size(), priors=False, fixed_noise=False):
    x, y = make_data(num_points, batch_shape)
    if fixed_noise:
        noise = 0.05 + 0.1 * torch.rand(*batch_shape, num_points, generator=torch.Generator())
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
    else:
        noise_prior = gpytorch.priors.GammaPrior(1.1, 0.5) if priors else None
        likelihood = gpytorch.likelihoods.GaussianLikelihood(
            batch_shape=batch_shape, noise_prior=noise_prior
        )
    model = ExactGPModel(x, y, likelihood, batch_shape, priors=priors)
    model.train()
    likelihood.train()
    return x, y, likelihood, model


@pytest.mark.parametrize(
    "batch_shape,priors,fixed_noise",
    [
        (torch.Size(), False, False),
        (torch.Size(), True, False),
        (torch.Size([3]), True, False),
        (torch.Size(), False, True),
        (torch.Size([2]), False, True),
    ],
)
def test_every_mask_equals_the_exact_marginal_log_likelihood(batch_shape, priors, fixed_noise):
    x, y, likelihood, model = gaussian_setup(6, batch_shape, priors, fixed_noise)
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    masked = MaskedMarginalLogLikelihood(likelihood, model, num_masks="all")(model(x), y)
    assert masked.shape == batch_shape
    assert torch.allclose(masked, exact, rtol=1e-9)


def test_normalisation_is_per_data_point():
    x, y, likelihood, model = gaussian_setup(8)
    mll = MaskedMarginalLogLikelihood(likelihood, model, mask=2, num_masks="all")
    marginal = likelihood(model(x))
    expected = masked_log_prob(marginal, y, mask=2, num_masks="all") / 8
    assert torch.allclose(mll(model(x), y), expected, rtol=1e-12)


def test_random_cumulative_masks_are_unbiased():
    x, y, likelihood, model = gaussian_setup(15)
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    mll = MaskedMarginalLogLikelihood(likelihood, model)
    with torch.no_grad():
        values = torch.stack([mll(model(x), y) for _ in range(400)])
    standard_error = values.std() / math.sqrt(len(values))
    assert values.std() > 0
    assert abs(values.mean() - exact) < 4 * standard_error


def test_seeded_masks_are_fixed_and_leave_the_global_generator_alone():
    x, y, likelihood, model = gaussian_setup(12)
    mll = MaskedMarginalLogLikelihood(likelihood, model, seed=5)
    torch.manual_seed(1)
    first = mll(model(x), y)
    after_first = torch.rand(3)
    torch.manual_seed(1)
    second = mll(model(x), y)
    after_second = torch.rand(3)
    other = MaskedMarginalLogLikelihood(likelihood, model, seed=6)(model(x), y)
    assert torch.equal(first, second)
    assert torch.equal(after_first, after_second)
    torch.manual_seed(1)
    assert torch.equal(after_first, torch.rand(3))  # no draws from the global generator
    assert not torch.equal(first, other)


def fit_hyperparameters(mll_class, steps, optimizer, **mll_kwargs):
    x, y = make_data(40, seed=3)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(x, y, likelihood)
    likelihood.noise = 2.0  # far from the optimum
    model.train()
    mll = mll_class(likelihood, model, **mll_kwargs)
    optim = optimizer(model.parameters())

    def closure():
        optim.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        optim.step(closure)
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    with torch.no_grad():
        return exact(model(x), y).item(), likelihood.noise.item()


def test_lbfgs_on_the_seeded_objective_reaches_the_exact_optimum():
    lbfgs = lambda params: torch.optim.LBFGS(params, max_iter=50, line_search_fn="strong_wolfe")  # noqa: E731
    start, _ = fit_hyperparameters(gpytorch.mlls.ExactMarginalLogLikelihood, 0, lbfgs)
    exact, exact_noise = fit_hyperparameters(gpytorch.mlls.ExactMarginalLogLikelihood, 2, lbfgs)
    masked, masked_noise = fit_hyperparameters(
        MaskedMarginalLogLikelihood, 2, lbfgs, num_masks=8, seed=0
    )
    assert exact - start > 0.2  # per data point: there was a long way to go
    assert exact - 0.01 < masked <= exact + 1e-6
    assert masked_noise == pytest.approx(exact_noise, rel=0.2)


def test_float32():
    torch.set_default_dtype(torch.float32)  # reset by conftest
    x, y = make_data(20, dtype=torch.float32)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(x, y, likelihood)
    model.train()
    value = MaskedMarginalLogLikelihood(likelihood, model, num_masks=200)(model(x), y)
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    assert value.dtype == torch.float32
    assert abs(value.item() - exact.item()) < 0.05


def test_unsupported_likelihoods_and_models_get_clear_errors():
    x, y, likelihood, model = gaussian_setup(5)
    with pytest.raises(TypeError, match="needs a Gaussian likelihood"):
        MaskedMarginalLogLikelihood(gpytorch.likelihoods.BernoulliLikelihood(), model)
    with pytest.raises(TypeError, match="multitask likelihood"):
        MaskedMarginalLogLikelihood(
            gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2), model
        )
    with pytest.raises(TypeError, match="model must be a gpytorch.models.GP"):
        MaskedMarginalLogLikelihood(likelihood, torch.nn.Linear(1, 1))
    mll = MaskedMarginalLogLikelihood(likelihood, model)
    multitask = gpytorch.distributions.MultitaskMultivariateNormal(torch.zeros(5, 2), torch.eye(10))
    with pytest.raises(TypeError, match="single-output"):
        mll(multitask, torch.zeros(5, 2))
    with pytest.raises(TypeError, match="function_dist must be"):
        mll(torch.distributions.Normal(0.0, 1.0), y)


def test_bad_targets_and_options_get_clear_errors():
    x, y, likelihood, model = gaussian_setup(5)
    mll = MaskedMarginalLogLikelihood(likelihood, model)
    with pytest.raises(ValueError, match="the GP has 5 data points"):
        mll(model(x), y[:4])
    with pytest.raises(ValueError, match="target contains NaN"):
        mll(model(x), torch.where(y > 0, torch.nan, y))
    with pytest.raises(ValueError, match="mask="):
        MaskedMarginalLogLikelihood(likelihood, model, mask="random")
    with pytest.raises(ValueError, match="num_masks"):
        MaskedMarginalLogLikelihood(likelihood, model, num_masks=0)
    with pytest.raises(TypeError, match="seed"):
        MaskedMarginalLogLikelihood(likelihood, model, seed=1.5)


@requires_cuda
def test_cuda_with_seed():
    x, y, likelihood, model = gaussian_setup(30)
    x, y, likelihood, model = x.cuda(), y.cuda(), likelihood.cuda(), model.cuda()
    mll = MaskedMarginalLogLikelihood(likelihood, model, num_masks=4, seed=0)
    first, second = mll(model(x), y), mll(model(x), y)
    assert first.device.type == "cuda" and torch.equal(first, second)
    (-first).backward()
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
    assert abs(first.item() - exact.item()) < 0.5


# -- BoTorch ---------------------------------------------------------------------------------


def hartmann_data(num_points, seed):
    from botorch.test_functions import Hartmann

    generator = torch.Generator().manual_seed(1000 + seed)
    x = torch.rand(num_points, 6, generator=generator)
    y = Hartmann(dim=6)(x).unsqueeze(-1) + 0.05 * torch.randn(num_points, 1, generator=generator)
    return x, y


def botorch_fit(x, y, make_mll):
    """Fit a fresh ``SingleTaskGP`` with ``fit_gpytorch_mll``; return its exact log likelihood
    per data point at the fitted hyperparameters (in BoTorch's standardised units)."""
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP

    model = SingleTaskGP(x, y)
    fit_gpytorch_mll(make_mll(model))
    model.train()
    exact = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    inputs = [model.transform_inputs(t) for t in model.train_inputs]
    with torch.no_grad():
        return exact(model(*model.train_inputs), model.train_targets, *inputs).item()


def test_botorch_fit_in_the_deterministic_mode_at_defaults_matches_the_exact_fit():
    pytest.importorskip("botorch")
    x, y = hartmann_data(60, seed=1)
    exact = botorch_fit(x, y, lambda m: gpytorch.mlls.ExactMarginalLogLikelihood(m.likelihood, m))
    masked = botorch_fit(x, y, lambda m: MaskedMarginalLogLikelihood(m.likelihood, m, seed=0))
    one_permutation = botorch_fit(
        x, y, lambda m: MaskedMarginalLogLikelihood(m.likelihood, m, num_masks=1, seed=0)
    )
    assert exact - 0.02 < masked <= exact + 1e-6
    # Negative control: one fixed permutation is the biased objective the default avoids.
    assert one_permutation < exact - 0.02


@pytest.mark.filterwarnings("ignore:A not p.d.:linear_operator.utils.warnings.NumericalWarning")
def test_botorch_restarts_a_fit_whose_covariance_is_not_positive_definite(caplog):
    pytest.importorskip("botorch")
    from botorch.fit import fit_gpytorch_mll
    from botorch.logging import logger
    from botorch.models import SingleTaskGP

    x, y = hartmann_data(12, seed=0)
    x = torch.cat([x, x])  # duplicate inputs: with a huge signal variance K + noise is singular
    y = torch.cat([y, y + 0.01])
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(ard_num_dims=6),
        outputscale_prior=gpytorch.priors.GammaPrior(2.0, 0.15),
    )
    model = SingleTaskGP(x, y, covar_module=kernel)
    kernel.outputscale = 1e14  # the first attempt starts here and fails
    mll = MaskedMarginalLogLikelihood(model.likelihood, model, seed=0)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            fit_gpytorch_mll(mll)
    finally:
        logger.removeHandler(caplog.handler)
    assert not mll.training  # BoTorch's sign of a successful fit
    assert "attempt #1 of 5 failed" in caplog.text
    assert "the covariance" in caplog.text and "not positive definite" in caplog.text
    assert kernel.outputscale.item() < 1e6  # resampled from its prior


def test_random_masks_under_botorch_warn_once():
    pytest.importorskip("botorch")
    from botorch.fit import fit_gpytorch_mll
    from botorch.models import SingleTaskGP

    from pyro_masked.gpytorch import RandomMasksUnderDeterministicOptimizerWarning

    x, y = hartmann_data(10, seed=0)
    model = SingleTaskGP(x, y)
    mll = MaskedMarginalLogLikelihood(model.likelihood, model)
    with pytest.warns(RandomMasksUnderDeterministicOptimizerWarning, match="seed=0") as record:
        fit_gpytorch_mll(mll, optimizer_kwargs={"options": {"maxiter": 3}})
    ours = [w for w in record if w.category is RandomMasksUnderDeterministicOptimizerWarning]
    assert len(ours) == 1

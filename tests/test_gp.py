import inspect
import math

import gpytorch
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import requires_cuda
from pyro.infer import SVI, Trace_ELBO

from pyro_masked import MaskedELBO
from pyro_masked.gp import GPRegression, fit
from pyro_masked.gpytorch import RandomMasksUnderDeterministicOptimizerWarning


def rbf_data(num_points=30, seed=1, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    X = torch.rand(num_points, generator=generator, dtype=dtype) * 5
    y = torch.sin(2 * X) + 0.2 * torch.randn(num_points, generator=generator, dtype=dtype)
    return X, y


def rbf_gp(X, y, **kwargs):
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    return GPRegression(X, y, kernel, noise=kwargs.pop("noise", 0.3), **kwargs)


def dense_evidence(gp):
    """The oracle: the Gaussian log density of y, from the dense covariance matrix."""
    with torch.no_grad():
        K = gp.kernel(gp.X).to_dense()
        mean = gp.mean_function(gp.X)
        covariance = K + (gp.noise + gp.jitter) * torch.eye(len(gp.y))
        return dist.MultivariateNormal(mean, covariance).log_prob(gp.y)


def test_exact_objective_is_the_gaussian_log_evidence():
    X, y = rbf_data()
    gp = rbf_gp(X, y)
    loss = Trace_ELBO().differentiable_loss(gp.model, gp.guide)
    assert torch.allclose(-loss, dense_evidence(gp), rtol=1e-10)
    assert torch.allclose(gp.log_marginal_likelihood(), dense_evidence(gp), rtol=1e-10)


def test_masked_elbo_over_every_mask_equals_the_exact_evidence():
    # Composite kernel on 2-D inputs with ARD lengthscales and a constant mean.
    generator = torch.Generator().manual_seed(2)
    X = torch.rand(7, 2, generator=generator)
    y = torch.randn(7, generator=generator)
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(ard_num_dims=2)
    ) + gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.MaternKernel(nu=2.5) * gpytorch.kernels.PeriodicKernel()
    )
    mean = gpytorch.means.ConstantMean()
    with torch.no_grad():
        mean.constant.fill_(0.4)
    gp = GPRegression(X, y, kernel, mean_function=mean, noise=0.2)
    masked = MaskedELBO(num_masks="all").differentiable_loss(gp.model, gp.guide)
    assert torch.allclose(-masked, dense_evidence(gp), rtol=1e-9)


def test_cumulative_masked_loss_is_unbiased_for_the_evidence():
    X, y = rbf_data(num_points=20)
    gp = rbf_gp(X, y)
    elbo = MaskedELBO(mask="cumulative", num_masks=1)
    with torch.no_grad():
        losses = torch.stack([elbo.differentiable_loss(gp.model, gp.guide) for _ in range(400)])
    standard_error = losses.std() / math.sqrt(len(losses))
    assert abs(-losses.mean() - dense_evidence(gp)) < 4 * standard_error
    assert losses.std() > 0  # the masks are random


def test_prediction_matches_the_dense_posterior_formulas():
    X, y = rbf_data(num_points=15)
    gp = rbf_gp(X, y)
    Xnew = torch.linspace(-1, 6, 9)
    with torch.no_grad():
        K = gp.kernel(gp.X).to_dense() + (gp.noise + gp.jitter) * torch.eye(15)
        cross = gp.kernel(gp.X, Xnew.unsqueeze(-1)).to_dense()
        prior = gp.kernel(Xnew.unsqueeze(-1)).to_dense()
        expected_mean = cross.T @ torch.linalg.inv(K) @ y
        expected_cov = prior - cross.T @ torch.linalg.inv(K) @ cross
        mean, cov = gp(Xnew, full_cov=True)
        mean_diag, var = gp(Xnew)
        _, noisy_var = gp(Xnew, noiseless=False)
        _, noisy_cov = gp(Xnew, full_cov=True, noiseless=False)
    assert torch.allclose(mean, expected_mean, atol=1e-9)
    assert torch.allclose(cov, expected_cov, atol=1e-9)
    assert torch.allclose(mean_diag, mean) and torch.allclose(var, torch.diagonal(cov), atol=1e-9)
    assert torch.allclose(noisy_var, var + gp.noise.detach())
    assert torch.allclose(noisy_cov, cov + gp.noise.detach() * torch.eye(9))


def test_masked_fit_reaches_the_exact_fit_evidence():
    X, y = rbf_data(num_points=40)
    fits = {}
    for objective in ("masked", "exact"):
        gp = rbf_gp(X, y, noise=1.0)
        fit(gp, objective=objective, num_steps=150, lr=0.1, lr_decay=0.05, seed=0, progress=False)
        fits[objective] = gp
    start = rbf_gp(X, y, noise=1.0).log_marginal_likelihood().item()
    masked = fits["masked"].log_marginal_likelihood().item()
    exact = fits["exact"].log_marginal_likelihood().item()
    assert exact - start > 10  # the fit had a long way to go
    assert exact - 1.0 < masked <= exact + 1e-6  # the exact fit is the maximum
    noise = {key: gp.noise.item() for key, gp in fits.items()}
    assert noise["masked"] == pytest.approx(noise["exact"], rel=0.3)


def test_fit_is_reproducible_and_reports_losses_while_it_runs():
    X, y = rbf_data(num_points=20)
    seen = []
    history = []

    def callback(step, loss):
        seen.append((step, loss, len(history)))

    first = fit(
        rbf_gp(X, y), num_steps=5, seed=3, progress=False, history=history, callback=callback
    )
    second = fit(rbf_gp(X, y), num_steps=5, seed=3, progress=False)
    third = fit(rbf_gp(X, y), num_steps=5, seed=4, progress=False)
    assert first is history and len(history) == 5
    assert [(step, count) for step, _, count in seen] == [(i, i + 1) for i in range(5)]
    assert first == second
    assert first != third


def test_fit_leaves_the_global_param_store_alone():
    pyro.param("unrelated", torch.tensor(1.0))
    X, y = rbf_data(num_points=10)
    fit(rbf_gp(X, y), num_steps=2, progress=False)
    assert set(pyro.get_param_store().keys()) == {"unrelated"}


def test_svi_with_the_param_store_trains_the_gpytorch_kernel():
    X, y = rbf_data(num_points=20)
    gp = rbf_gp(X, y)
    before = gp.kernel.base_kernel.raw_lengthscale.detach().clone()
    svi = SVI(gp.model, gp.guide, pyro.optim.Adam({"lr": 0.1}), MaskedELBO())
    for _ in range(3):
        svi.step()
    names = set(pyro.get_param_store().keys())
    assert "kernel$$$base_kernel.raw_lengthscale" in names and "noise" in names
    assert not torch.equal(gp.kernel.base_kernel.raw_lengthscale.detach(), before)


@pytest.mark.parametrize("guide", ["delta", "normal"])
def test_priors_on_hyperparameters_become_latent_sites_of_the_guide(guide):
    X, y = rbf_data(num_points=20)
    priors = {
        "noise": dist.LogNormal(-2.0, 1.0),
        "kernel.base_kernel.lengthscale": dist.LogNormal(0.0, 1.0),
    }
    gp = rbf_gp(X, y, priors=priors, guide=guide)
    fit(gp, objective="masked", num_steps=30, lr=0.05, seed=0, progress=False)
    median = gp.autoguide.median()
    assert set(median) == {"noise", "kernel.base_kernel.lengthscale"}
    assert median["kernel.base_kernel.lengthscale"].shape == (1, 1)
    # Prediction uses the guide's median for hyperparameters with priors.
    with torch.no_grad():
        plain = rbf_gp(X, y, noise=median["noise"].item())
        plain.kernel.outputscale = gp.kernel.outputscale
        plain.kernel.base_kernel.lengthscale = median["kernel.base_kernel.lengthscale"]
        expected = plain(torch.tensor([1.0, 2.0]), noiseless=False)
        actual = gp(torch.tensor([1.0, 2.0]), noiseless=False)
    assert torch.allclose(actual[0], expected[0]) and torch.allclose(actual[1], expected[1])


def test_map_objective_adds_the_log_prior():
    X, y = rbf_data(num_points=12)
    prior = dist.Gamma(2.0, 2.0)
    gp = rbf_gp(X, y, priors={"kernel.outputscale": prior})
    gp.guide()
    loss = Trace_ELBO().differentiable_loss(gp.model, gp.guide)
    outputscale = gp.autoguide.median()["kernel.outputscale"]
    with torch.no_grad():
        gp.kernel.outputscale = outputscale
    expected = dense_evidence(gp) + prior.log_prob(outputscale)
    assert torch.allclose(-loss, expected, rtol=1e-9)


def test_bad_inputs_get_errors_naming_the_argument():
    X, y = rbf_data(num_points=10)
    kernel = gpytorch.kernels.RBFKernel()
    with pytest.raises(ValueError, match="X has 10 inputs but y has 9"):
        GPRegression(X, y[:-1], kernel)
    with pytest.raises(ValueError, match="X contains NaN"):
        GPRegression(torch.where(X > 2, torch.nan, X), y, kernel)
    with pytest.raises(ValueError, match="y contains NaN"):
        GPRegression(X, torch.where(y > 0, torch.nan, y), kernel)
    with pytest.raises(ValueError, match=r"y must have shape \(N,\)"):
        GPRegression(X, y.unsqueeze(-1), kernel)
    with pytest.raises(TypeError, match="kernel must be"):
        GPRegression(X, y, "rbf")
    with pytest.raises(ValueError, match="noise must be a positive"):
        GPRegression(X, y, kernel, noise=0.0)
    with pytest.raises(ValueError, match="priors key 'kernel.period'"):
        GPRegression(X, y, kernel, priors={"kernel.period": dist.LogNormal(0.0, 1.0)})
    gp = GPRegression(X, y, kernel)
    with pytest.raises(ValueError, match="Xnew has 2 input dimensions"):
        gp(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="objective must be"):
        fit(gp, objective="loo", progress=False)


# The matrix is singular on purpose: the jitter attempts warn before the error.
@pytest.mark.filterwarnings("ignore:A not p.d.:linear_operator.utils.warnings.NumericalWarning")
@pytest.mark.parametrize("objective", ["masked", "exact"])
def test_singular_kernel_matrix_raises_and_leaves_hyperparameters_unchanged(objective):
    # Duplicate inputs, a huge signal variance and a noise below its rounding error: the
    # covariance of y is singular in floating point even after jitter.
    X = torch.tensor([0.0, 0.0, 1.0, 2.0])
    y = torch.tensor([0.1, 0.2, 0.3, 0.4])
    gp = rbf_gp(X, y, noise=1e-8, jitter=0.0)
    gp.kernel.outputscale = 1e14
    before = {name: p.detach().clone() for name, p in gp.named_parameters()}
    with pytest.raises(ValueError, match="not positive definite"):
        fit(gp, objective=objective, num_steps=3, progress=False)
    for name, p in gp.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_a_step_that_makes_a_parameter_non_finite_is_undone():
    X, y = rbf_data(num_points=10)
    gp = rbf_gp(X, y)
    before = {name: p.detach().clone() for name, p in gp.named_parameters()}

    class Overflowing(torch.optim.SGD):
        """Takes an ordinary step, then overflows the last parameter."""

        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][-1].fill_(math.inf)

    with pytest.raises(FloatingPointError, match="undone"):
        fit(gp, objective="exact", num_steps=2, optimizer=Overflowing, progress=False)
    for name, p in gp.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_float32_masked_loss_tracks_the_exact_evidence():
    X, y = rbf_data(num_points=20, dtype=torch.float32)
    torch.set_default_dtype(torch.float32)  # the kernel's parameters (reset by conftest)
    gp = rbf_gp(X, y)
    assert gp.noise.dtype == torch.float32
    loss = MaskedELBO(num_masks=50).differentiable_loss(gp.model, gp.guide)
    assert loss.dtype == torch.float32
    exact = gp.log_marginal_likelihood()
    assert abs(-loss.item() - exact.item()) < 0.1 * abs(exact.item()) + 1.0


@requires_cuda
def test_gp_on_cuda():
    X, y = rbf_data(num_points=30)
    X, y = X.cuda(), y.cuda()
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()).cuda()
    gp = GPRegression(X, y, kernel, noise=0.3)
    losses = fit(gp, num_steps=3, seed=0, progress=False)
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    mean, var = gp(torch.linspace(0, 5, 4, device="cuda"))
    assert mean.device.type == "cuda" and var.device.type == "cuda"
    assert torch.isclose(gp.log_marginal_likelihood().cpu(), dense_evidence(gp).cpu())


# -- a drop-in for pyro.contrib.gp ------------------------------------------------------------


def test_signature_is_pyro_contrib_gp_gpregressions():
    from pyro.contrib.gp.models import GPRegression as PyroGPRegression

    ours = list(inspect.signature(GPRegression).parameters)
    pyros = list(inspect.signature(PyroGPRegression).parameters)
    assert ours[: len(pyros)] == pyros
    # Pyro's positional call, with a tensor noise (copied, not aliased) and a callable mean.
    X, y = rbf_data(num_points=12)
    noise = torch.tensor(0.2)
    gp = GPRegression(X, y, gpytorch.kernels.RBFKernel(), noise, lambda x: 0.5 * x[:, 0])
    with torch.no_grad():
        noise.fill_(7.0)
        K = gp.kernel(gp.X).to_dense() + (0.2 + gp.jitter) * torch.eye(12)
        expected = dist.MultivariateNormal(0.5 * X, K).log_prob(y)
    assert gp.noise.item() == pytest.approx(0.2)
    assert torch.allclose(gp.log_marginal_likelihood(), expected, rtol=1e-10)
    assert GPRegression(X, y, gpytorch.kernels.RBFKernel()).noise.item() == 1.0  # Pyro's default


def test_noise_that_is_not_a_positive_scalar_gets_a_clear_error():
    X, y = rbf_data(num_points=5)
    kernel = gpytorch.kernels.RBFKernel()
    with pytest.raises(ValueError, match="noise must be a scalar"):
        GPRegression(X, y, kernel, noise=torch.ones(2))
    with pytest.raises(ValueError, match="noise must be a positive"):
        GPRegression(X, y, kernel, noise=torch.tensor(-1.0))
    with pytest.raises(TypeError, match="noise must be"):
        GPRegression(X, y, kernel, noise="0.1")
    with pytest.raises(ValueError, match="plain callable"):
        GPRegression(
            X, y, kernel, 1.0, lambda x: x[:, 0], priors={"mean_function.c": dist.Normal(0, 1)}
        )


def lbfgs(params, lr):
    return torch.optim.LBFGS(params, lr=lr, max_iter=50, line_search_fn="strong_wolfe")


def test_lbfgs_on_the_seeded_objective_reaches_the_exact_optimum():
    X, y = rbf_data(num_points=40)
    fits = {}
    for objective in ("masked", "exact"):
        gp = rbf_gp(X, y, noise=1.0)
        fit(gp, objective=objective, optimizer=lbfgs, lr=1.0, num_steps=3, seed=0, progress=False)
        fits[objective] = gp.log_marginal_likelihood().item()
    start = rbf_gp(X, y, noise=1.0).log_marginal_likelihood().item()
    assert fits["exact"] - start > 10  # the fit had a long way to go
    # Within 0.02 nats per point of the exact optimum (deterministic_num_masks's promise).
    assert fits["exact"] - 0.02 * 40 < fits["masked"] <= fits["exact"] + 1e-6


def test_lbfgs_on_random_masks_warns():
    X, y = rbf_data(num_points=10)
    with pytest.warns(RandomMasksUnderDeterministicOptimizerWarning, match="seed=0"):
        fit(rbf_gp(X, y), optimizer=lbfgs, lr=1.0, num_steps=1, progress=False)


class EvaluateOnly(torch.optim.SGD):
    """Evaluates the closure and moves nothing: every step sees the same hyperparameters."""

    def step(self, closure):
        return closure()


def test_seed_fixes_the_masks_and_leaves_the_global_generator_alone():
    X, y = rbf_data(num_points=20)
    torch.manual_seed(1)
    seeded = fit(rbf_gp(X, y), optimizer=EvaluateOnly, num_steps=3, seed=5, progress=False)
    after_fit = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after_fit, torch.rand(3))  # no draws from, no reseeding of, torch's
    assert seeded[0] == seeded[1] == seeded[2]  # the same masks at every step
    other_seed = fit(rbf_gp(X, y), optimizer=EvaluateOnly, num_steps=1, seed=6, progress=False)
    assert other_seed[0] != seeded[0]
    random = fit(rbf_gp(X, y), optimizer=EvaluateOnly, num_steps=3, progress=False)
    assert len(set(random)) == 3  # seed=None: new masks at every step


@pytest.mark.parametrize("guide", ["delta", "normal"])
def test_a_trained_model_with_priors_loads_strictly_into_a_fresh_one(guide):
    X, y = rbf_data(num_points=20)
    priors = {
        "noise": dist.LogNormal(-2.0, 1.0),
        "kernel.base_kernel.lengthscale": dist.LogNormal(0.0, 1.0),
    }
    trained = rbf_gp(X, y, priors=priors, guide=guide)
    fit(trained, num_steps=20, lr=0.05, progress=False)
    fresh = rbf_gp(X, y, priors=priors, guide=guide)
    assert any(key.startswith("autoguide.") for key in fresh.state_dict())
    fresh.load_state_dict(trained.state_dict())  # strict
    Xnew = torch.tensor([0.5, 2.5])
    with torch.no_grad():
        for expected, actual in zip(trained(Xnew), fresh(Xnew)):
            assert torch.equal(expected, actual)
    for name, value in trained.autoguide.median().items():
        assert torch.equal(value, fresh.autoguide.median()[name])
    assert not torch.equal(
        fresh.autoguide.median()["noise"], rbf_gp(X, y, priors=priors, guide=guide).noise
    )


def test_the_guide_starts_at_the_hyperparameters_the_model_was_built_with():
    X, y = rbf_data(num_points=10)
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    kernel.base_kernel.lengthscale = 0.7
    priors = {"noise": dist.LogNormal(0.0, 1.0), "kernel.base_kernel.lengthscale": dist.Gamma(2, 2)}
    torch.manual_seed(0)
    gp = GPRegression(X, y, kernel, noise=0.3, priors=priors)
    after = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(2))  # building the guide leaves torch's generator alone
    median = gp.autoguide.median()
    assert median["noise"].item() == pytest.approx(0.3)
    assert median["kernel.base_kernel.lengthscale"].item() == pytest.approx(0.7)

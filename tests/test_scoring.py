import gpytorch
import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import requires_cuda
from linear_operator import to_linear_operator
from oracles import random_spd

from pyro_masked import UnsupportedDistributionError, masked_log_prob
from pyro_masked.conditionals.gaussian import MAX_ENUMERATED_MASKS
from pyro_masked.masks import SizeWeights


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)])
def test_masked_scores_over_all_sizes_sum_to_the_log_density(size, batch_shape):
    covariance = random_spd(size)
    loc = torch.randn(size)
    d = dist.MultivariateNormal(loc, covariance)
    value = torch.randn(batch_shape + (size,)) + loc
    total = sum(masked_log_prob(d, value, mask=m, num_masks="all") for m in range(1, size + 1))
    assert total.shape == batch_shape
    assert torch.allclose(total / size, d.log_prob(value), atol=1e-8, rtol=0)
    cumulative = masked_log_prob(d, value, mask="cumulative", num_masks="all")
    assert torch.allclose(cumulative, d.log_prob(value), atol=1e-8, rtol=0)


def test_batched_covariances_and_means():
    covariance = torch.stack([random_spd(4) for _ in range(3)])
    loc = torch.randn(2, 1, 4)
    d = dist.MultivariateNormal(loc, covariance)  # batch (2, 3)
    value = torch.randn(5, 2, 3, 4)
    score = masked_log_prob(d, value, num_masks="all")
    assert score.shape == (5, 2, 3)
    assert torch.allclose(score, d.log_prob(value), atol=1e-8)


def test_cumulative_estimate_is_unbiased():
    size = 6
    d = dist.MultivariateNormal(torch.randn(size), random_spd(size))
    value = d.sample()
    estimates = torch.stack([masked_log_prob(d, value) for _ in range(2000)])
    stderr = estimates.std() / len(estimates) ** 0.5
    assert abs(estimates.mean() - d.log_prob(value)) < 4 * stderr
    assert estimates.std() > 0  # the estimate is random: the test above can fail


def test_fixed_size_estimate_is_unbiased_for_its_expectation():
    size = 6
    d = dist.MultivariateNormal(torch.zeros(size), random_spd(size))
    value = d.sample()
    exact = masked_log_prob(d, value, mask=2, num_masks="all")
    estimates = torch.stack([masked_log_prob(d, value, mask=2) for _ in range(600)])
    stderr = estimates.std() / len(estimates) ** 0.5
    assert abs(estimates.mean() - exact) < 4 * stderr


def test_num_masks_averages_permutations():
    d = dist.MultivariateNormal(torch.zeros(5), random_spd(5))
    value = d.sample((3,))
    single = torch.stack([masked_log_prob(d, value) for _ in range(150)]).var(0)
    averaged = torch.stack([masked_log_prob(d, value, num_masks=16) for _ in range(150)]).var(0)
    assert (averaged < single / 4).all()


@pytest.mark.parametrize("mask", ["cumulative", 1, 3, 0.5])
def test_all_gaussian_parameterisations_agree(mask):
    size = 5
    factor, diag = torch.randn(size, 2), torch.rand(size) + 0.5
    covariance = factor @ factor.T + torch.diag(diag)
    loc = torch.randn(size)
    value = torch.randn(3, size)
    dists = [
        dist.MultivariateNormal(loc, covariance),
        dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(covariance)),
        dist.MultivariateNormal(loc, precision_matrix=torch.linalg.inv(covariance)),
        dist.LowRankMultivariateNormal(loc, factor, diag),
        gpytorch.distributions.MultivariateNormal(loc, covariance),
        gpytorch.distributions.MultivariateNormal(loc, to_linear_operator(covariance)),
    ]
    scores = []
    for d in dists:
        torch.manual_seed(3)
        scores.append(masked_log_prob(d, value, mask=mask, num_masks=2))
    for score in scores[1:]:
        assert torch.allclose(score, scores[0], atol=1e-8)


def test_gpytorch_batched_kernel():
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])), batch_shape=torch.Size([2])
    )
    x = torch.linspace(0, 1, 6)[:, None]
    with torch.no_grad():
        kernel.base_kernel.lengthscale = torch.tensor([[[0.3]], [[0.7]]])
    covariance = kernel(x).add_diagonal(torch.tensor(0.1))
    d = gpytorch.distributions.MultivariateNormal(torch.zeros(2, 6), covariance)
    value = torch.randn(2, 6)
    score = masked_log_prob(d, value, num_masks="all")
    assert score.shape == (2,)
    assert torch.allclose(score, d.log_prob(value), atol=1e-8)
    estimate = masked_log_prob(d, value, num_masks=4)
    assert estimate.shape == (2,) and torch.isfinite(estimate).all()


def test_gradients_reach_kernel_hyperparameters():
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
    x = torch.linspace(0, 1, 20)[:, None]
    d = gpytorch.distributions.MultivariateNormal(
        torch.zeros(20), kernel(x).add_diagonal(torch.tensor(0.05))
    )
    masked_log_prob(d, torch.randn(20)).backward()
    assert kernel.raw_outputscale.grad is not None
    assert kernel.base_kernel.raw_lengthscale.grad.abs() > 0


def test_gradcheck_through_the_covariance():
    value = torch.randn(3, 4)
    covariance = random_spd(4).requires_grad_()

    def score(covariance):
        torch.manual_seed(5)
        d = dist.MultivariateNormal(torch.zeros(4), 0.5 * (covariance + covariance.T))
        return masked_log_prob(d, value, num_masks=2)

    assert torch.autograd.gradcheck(score, (covariance,))


@pytest.mark.parametrize("mask", ["cumulative", 1, 0.3, SizeWeights(lambda d: torch.ones(d))])
def test_factorized_distributions_score_their_log_density(mask):
    d = dist.Normal(torch.randn(3, 5), torch.rand(3, 5) + 0.1).to_event(1)
    value = d.sample()
    assert torch.equal(masked_log_prob(d, value, mask=mask), d.log_prob(value))
    images = dist.Bernoulli(logits=torch.randn(2, 4, 4)).to_event(2)
    pixels = images.sample()
    assert torch.equal(masked_log_prob(images, pixels, mask=mask), images.log_prob(pixels))


def test_univariate_has_nothing_to_mask():
    d = dist.Normal(torch.zeros(4), 1.0)
    value = torch.randn(4)
    assert torch.equal(masked_log_prob(d, value), d.log_prob(value))


def test_expanded_and_masked_distributions():
    base = dist.MultivariateNormal(torch.zeros(3), random_spd(3))
    value = torch.randn(4, 3)
    expanded = masked_log_prob(base.expand([4]), value, num_masks="all")
    assert torch.allclose(expanded, base.log_prob(value))
    keep = torch.tensor([True, False, True, True])
    masked = masked_log_prob(base.expand([4]).mask(keep), value, num_masks="all")
    assert torch.allclose(masked, torch.where(keep, base.log_prob(value), 0.0))


def test_follows_dtype():
    covariance = random_spd(4).float()
    d = dist.MultivariateNormal(torch.zeros(4, dtype=torch.float32), covariance)
    value = torch.randn(7, 4).float()
    score = masked_log_prob(d, value, num_masks="all")
    assert score.dtype == torch.float32
    assert torch.allclose(score, d.log_prob(value), atol=1e-4)


@requires_cuda
def test_follows_cuda_device():
    d = dist.MultivariateNormal(torch.zeros(4).cuda(), random_spd(4).cuda())
    value = torch.randn(6, 4).cuda()
    for num_masks in (1, "all"):
        score = masked_log_prob(d, value, num_masks=num_masks)
        assert score.device.type == "cuda"
    assert torch.allclose(score, d.log_prob(value))


def test_reproducible_with_the_same_seed():
    import pyro

    d = dist.MultivariateNormal(torch.zeros(6), random_spd(6))
    value = torch.randn(6)
    pyro.set_rng_seed(11)
    first = masked_log_prob(d, value, num_masks=3)
    pyro.set_rng_seed(11)
    assert torch.equal(first, masked_log_prob(d, value, num_masks=3))


def test_bad_input_is_rejected_with_the_argument_named():
    d = dist.MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        masked_log_prob(d, torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        masked_log_prob(d, torch.tensor([0.0, float("inf"), 1.0]))
    with pytest.raises(ValueError, match="event shape"):
        masked_log_prob(d, torch.zeros(4))
    with pytest.raises(ValueError, match="rate"):
        masked_log_prob(d, torch.zeros(3), mask=1.5)
    with pytest.raises(ValueError, match="outside 1..3"):
        masked_log_prob(d, torch.zeros(3), mask=4)
    with pytest.raises(ValueError, match="num_masks must be >= 1"):
        masked_log_prob(d, torch.zeros(3), num_masks=0)
    with pytest.raises(ValueError, match="num_masks"):
        masked_log_prob(d, torch.zeros(3), num_masks="some")
    with pytest.raises(TypeError, match="tensor"):
        masked_log_prob(d, [0.0, 0.0, 0.0])
    with pytest.raises(UnsupportedDistributionError, match="Dirichlet has no masked"):
        masked_log_prob(dist.Dirichlet(torch.ones(3)), torch.ones(3) / 3)


def test_enumeration_past_the_limit_is_refused_except_in_closed_form():
    size = 40
    d = dist.MultivariateNormal(torch.zeros(size), torch.eye(size))
    value = torch.randn(size)
    with pytest.raises(ValueError, match=str(MAX_ENUMERATED_MASKS)):
        masked_log_prob(d, value, mask=4, num_masks="all")
    # leave-one-out and the empty context need no enumeration
    assert torch.allclose(masked_log_prob(d, value, mask=1, num_masks="all"), d.log_prob(value))
    assert torch.allclose(masked_log_prob(d, value, mask=size, num_masks="all"), d.log_prob(value))


@pytest.mark.parametrize("uniform", [True, False])
def test_cached_data_scatter_gives_the_same_gradients(monkeypatch, uniform):
    import pyro_masked.scoring as scoring

    data = torch.randn(40, 5)
    factor = torch.randn(5, 2, requires_grad=True)
    loc = torch.randn(5, requires_grad=True)
    weights = torch.ones(40) if uniform else torch.rand(40)

    def gradients():
        factor.grad = loc.grad = None
        torch.manual_seed(2)
        d = dist.MultivariateNormal(loc, factor @ factor.T + torch.eye(5))
        (weights * masked_log_prob(d, data, num_masks=3)).sum().backward()
        return factor.grad.clone(), loc.grad.clone()

    cached = gradients()
    data.mul_(2.0)  # an in-place change must invalidate the cached scatter
    cached_after_change = gradients()
    # So must a change no version counter sees (a NumPy view of the buffer rewritten).
    version = data._version
    data.numpy()[:3] += 1.0
    assert data._version == version
    cached_after_hidden_change = gradients()
    monkeypatch.setattr(scoring, "_ResidualScatter", lambda value, loc: None)
    reference_after_hidden_change = gradients()
    data.numpy()[:3] -= 1.0
    reference_after_change = gradients()
    data.div_(2.0)
    reference = gradients()
    got = cached + cached_after_change + cached_after_hidden_change
    expected = reference + reference_after_change + reference_after_hidden_change
    for got_grad, expected_grad in zip(got, expected):
        assert torch.allclose(got_grad, expected_grad, atol=1e-10)


def test_finite_values_whose_sum_overflows_are_accepted():
    from pyro_masked.scoring import all_finite

    huge = torch.tensor([1e308, 1e308, -1.0])
    assert all_finite(huge)
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")]))
    d = dist.Normal(torch.zeros(3), 1.0).to_event(1)
    assert masked_log_prob(d, huge) == d.log_prob(huge)


def test_independent_copies_of_a_gaussian_are_masked_one_base_event_at_a_time():
    base = dist.MultivariateNormal(torch.randn(3, 4), random_spd(4))
    d = base.to_event(1)  # event shape (3, 4): three independent 4-vectors
    value = torch.randn(2, 3, 4)
    assert torch.allclose(masked_log_prob(d, value, num_masks="all"), d.log_prob(value))
    per_row = masked_log_prob(base, value, mask=2, num_masks="all").sum(-1)
    assert torch.allclose(masked_log_prob(d, value, mask=2, num_masks="all"), per_row)
    with pytest.raises(ValueError, match="outside 1..4"):
        masked_log_prob(d, value, mask=5)


def test_pyro_contrib_gp_models_swap_their_loss():
    import pyro.contrib.gp as gp

    from pyro_masked import MaskedELBO

    inputs = torch.linspace(0, 1, 7)
    for targets in (torch.sin(6 * inputs), torch.stack([torch.sin(6 * inputs), inputs])):
        kernel = gp.kernels.RBF(input_dim=1)
        model = gp.models.GPRegression(inputs, targets, kernel, noise=torch.tensor(0.1))
        exact = pyro.infer.Trace_ELBO().loss(model.model, model.guide)
        masked = MaskedELBO(num_masks="all").loss(model.model, model.guide)
        assert masked == pytest.approx(exact, abs=1e-8)
        loo = MaskedELBO(mask=1, num_masks="all").loss(model.model, model.guide)
        assert loo != pytest.approx(exact, abs=1e-3)


@pytest.mark.parametrize("num_masks", [1, 3, "all"])
def test_integer_observations_are_promoted_to_the_distribution_dtype(num_masks):
    d = dist.MultivariateNormal(torch.zeros(4), random_spd(4))
    value = torch.randint(-3, 3, (5, 4))
    pyro.set_rng_seed(1)
    score = masked_log_prob(d, value, num_masks=num_masks)
    pyro.set_rng_seed(1)
    expected = masked_log_prob(d, value.double(), num_masks=num_masks)
    assert score.dtype == torch.float64
    assert torch.equal(score, expected)
    assert (score != 0).all()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_observations_are_scored_in_float32(half):
    d = dist.MultivariateNormal(torch.zeros(4).float(), random_spd(4).float())
    value = torch.randn(50, 4).to(half)
    score = masked_log_prob(d, value, num_masks="all")
    assert score.dtype == torch.float32
    exact = d.log_prob(value.float())
    # The identity holds to float32 rounding; in half precision it was off by ~0.1 nats.
    assert torch.allclose(score, exact, atol=1e-4, rtol=1e-5)


def test_value_shape_that_does_not_fit_is_a_value_error():
    d = dist.MultivariateNormal(torch.zeros(4), torch.eye(4)).expand([5])
    with pytest.raises(ValueError, match="event shape"):
        masked_log_prob(d, torch.randn(5, 3))
    with pytest.raises(ValueError, match="does not broadcast"):
        masked_log_prob(d, torch.randn(3, 4))

import pyro
import pyro.distributions as dist
import pytest
import torch
from oracles import random_spd
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroParam

from pyro_masked import MaskedELBO, masked_log_prob


def ppca_data(num_points=300, size=8, rank=2):
    generator = torch.Generator().manual_seed(4)
    weights = torch.randn(size, rank, generator=generator)
    latents = torch.randn(num_points, rank, generator=generator)
    return latents @ weights.T + 0.5 * torch.randn(num_points, size, generator=generator)


def ppca_model(data, rank=2):
    size = data.shape[-1]
    weights = pyro.param("W", 0.1 * torch.randn(size, rank))
    noise = pyro.param("noise", torch.tensor(2.0), constraint=dist.constraints.positive)
    covariance = weights @ weights.T + noise * torch.eye(size)
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(size), covariance), obs=data)


def empty_guide(data, rank=2):
    pass


def exact_log_likelihood(data, rank=2):
    weights, noise = pyro.param("W").detach(), pyro.param("noise").detach()
    covariance = weights @ weights.T + noise * torch.eye(data.shape[-1])
    return dist.MultivariateNormal(torch.zeros(data.shape[-1]), covariance).log_prob(data).sum()


def ppca_maximum_log_likelihood(data, rank=2):
    """Tipping & Bishop (1999): the maximum over W and the noise, in closed form."""
    num_points, size = data.shape
    eigenvalues, eigenvectors = torch.linalg.eigh(data.T @ data / num_points)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    noise = eigenvalues[rank:].mean()
    weights = eigenvectors[:, :rank] * (eigenvalues[:rank] - noise).sqrt()
    covariance = weights @ weights.T + noise * torch.eye(size)
    return dist.MultivariateNormal(torch.zeros(size), covariance).log_prob(data).sum()


def test_ppca_trained_by_cumulative_masking_reaches_the_maximum_likelihood():
    data = ppca_data()
    svi = SVI(ppca_model, empty_guide, pyro.optim.Adam({"lr": 0.05}), loss=MaskedELBO())
    for _ in range(300):
        svi.step(data)
    best = ppca_maximum_log_likelihood(data)
    assert abs(exact_log_likelihood(data) - best) < 0.01 * abs(best)


def test_ppca_trained_at_a_fixed_rate_improves_on_its_start():
    data = ppca_data()
    svi = SVI(ppca_model, empty_guide, pyro.optim.Adam({"lr": 0.05}), loss=MaskedELBO(mask=0.15))
    svi.step(data)
    start = exact_log_likelihood(data)
    for _ in range(200):
        svi.step(data)
    assert exact_log_likelihood(data) > start + 0.1 * abs(start)


COVARIANCE = random_spd(4, generator=torch.Generator().manual_seed(2)).double()


def global_latent_model(data):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(4), 1.0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(loc, COVARIANCE), obs=data)


def test_masked_elbo_is_an_unbiased_estimate_of_the_elbo():
    data = torch.randn(10, 4) + 1.0
    guide = AutoNormal(global_latent_model)
    guide(data)  # create the guide's parameters
    masked_elbo = MaskedELBO(num_particles=20, vectorize_particles=True)
    trace_elbo = Trace_ELBO(num_particles=20, vectorize_particles=True)
    masked = torch.tensor([masked_elbo.loss(global_latent_model, guide, data) for _ in range(300)])
    exact = torch.tensor([trace_elbo.loss(global_latent_model, guide, data) for _ in range(300)])
    stderr = (masked.var() / len(masked) + exact.var() / len(exact)).sqrt()
    assert abs(masked.mean() - exact.mean()) < 4 * stderr
    assert masked.var() > exact.var()  # masking adds noise, so the test above can fail


def test_loss_differentiable_loss_and_loss_and_grads_agree():
    data = torch.randn(10, 4)
    guide = AutoNormal(global_latent_model)
    guide(data)
    elbo = MaskedELBO(mask=0.5, num_particles=3)
    pyro.set_rng_seed(1)
    loss = elbo.loss(global_latent_model, guide, data)
    pyro.set_rng_seed(1)
    differentiable = elbo.differentiable_loss(global_latent_model, guide, data)
    pyro.set_rng_seed(1)
    with_grads = elbo.loss_and_grads(global_latent_model, guide, data)
    assert loss == pytest.approx(differentiable.item()) == pytest.approx(with_grads)


def test_vectorized_particles_match_sequential_ones_on_the_exact_expectation():
    data = torch.randn(10, 4)
    guide = AutoNormal(global_latent_model)
    guide(data)
    pyro.set_rng_seed(2)
    vectorized = MaskedELBO(num_masks="all", num_particles=4, vectorize_particles=True)
    loss = vectorized.loss(global_latent_model, guide, data)
    pyro.set_rng_seed(2)
    expected = Trace_ELBO(num_particles=4, vectorize_particles=True).loss(
        global_latent_model, guide, data
    )
    assert loss == pytest.approx(expected, abs=1e-8)


@pytest.mark.parametrize("mask", ["cumulative", 0.5])
def test_subsampled_plates_are_scaled_as_in_trace_elbo(mask):
    data = torch.randn(20, 4)

    def model(data):
        with pyro.plate("data", 20, subsample_size=5) as index:
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(4), COVARIANCE), obs=data[index])

    def guide(data):
        pass

    pyro.set_rng_seed(3)
    loss = MaskedELBO(mask=mask, num_masks="all", max_plate_nesting=1).loss(model, guide, data)
    pyro.set_rng_seed(3)
    index = poutine.trace(model).get_trace(data).nodes["data"]["value"]
    d = dist.MultivariateNormal(torch.zeros(4), COVARIANCE)
    expected = -4.0 * masked_log_prob(d, data[index], mask=mask, num_masks="all").sum()
    assert loss == pytest.approx(expected.item(), abs=1e-8)
    if mask == "cumulative":
        pyro.set_rng_seed(3)
        exact = Trace_ELBO(max_plate_nesting=1).loss(model, guide, data)
        assert loss == pytest.approx(exact, abs=1e-8)


def test_score_function_terms_of_non_reparameterised_guides():
    data = torch.randn(6, 4)

    def model(data):
        switch = pyro.sample("switch", dist.Bernoulli(0.5))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(switch * torch.ones(4), COVARIANCE), obs=data)

    def guide(data):
        logit = pyro.param("logit", torch.tensor(0.3))
        pyro.sample("switch", dist.Bernoulli(logits=logit))

    grads = []
    for elbo in (MaskedELBO(num_masks="all"), Trace_ELBO()):
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        elbo.loss_and_grads(model, guide, data)
        grads.append(pyro.param("logit").unconstrained().grad.clone())
    assert grads[0].abs() > 0
    assert torch.allclose(grads[0], grads[1])


def test_same_seed_gives_the_same_loss():
    data = ppca_data(50)
    ppca_model(data)
    elbo = MaskedELBO(num_masks=2)
    pyro.set_rng_seed(7)
    first = elbo.loss(ppca_model, empty_guide, data)
    pyro.set_rng_seed(7)
    assert elbo.loss(ppca_model, empty_guide, data) == first
    assert elbo.loss(ppca_model, empty_guide, data) != first


class PPCA(PyroModule):
    def __init__(self, size, rank):
        super().__init__()
        self.weights = PyroParam(0.1 * torch.randn(size, rank))
        self.noise = PyroParam(torch.tensor(2.0), constraint=dist.constraints.positive)

    def forward(self, data):
        size = data.shape[-1]
        covariance = self.weights @ self.weights.T + self.noise * torch.eye(size)
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(torch.zeros(size), covariance), obs=data)


def test_elbo_module_in_a_plain_pytorch_loop():
    data = ppca_data(100)
    model = PPCA(8, 2)
    loss_fn = MaskedELBO(num_masks=4)(model, lambda data: None)
    model(data)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_fn(data)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5]) - 0.1 * abs(sum(losses[:5]))


def test_bad_arguments_are_rejected_at_construction():
    with pytest.raises(ValueError, match="rate"):
        MaskedELBO(mask=1.2)
    with pytest.raises(ValueError, match="num_masks"):
        MaskedELBO(num_masks=0)
    with pytest.raises(TypeError, match="list of site names"):
        MaskedELBO(sites="x")


def test_nan_data_leaves_the_parameters_unchanged():
    data = ppca_data(20)
    svi = SVI(ppca_model, empty_guide, pyro.optim.Adam({"lr": 0.1}), loss=MaskedELBO())
    svi.step(data)
    before = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    data[3, 1] = float("nan")
    with pytest.raises(ValueError, match="site 'x'"):
        svi.step(data)
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), before[name])


def test_gpytorch_kernel_sites_including_batched_kernels():
    import gpytorch

    inputs = torch.linspace(0, 1, 6)[:, None]
    targets = torch.stack([torch.sin(6 * inputs[:, 0]), torch.cos(6 * inputs[:, 0])])
    kernel = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])), batch_shape=torch.Size([2])
    )

    def model(inputs, targets):
        pyro.module("kernel", kernel)
        covariance = kernel(inputs).add_diagonal(torch.tensor(0.01))
        with pyro.plate("outputs", 2):
            pyro.sample(
                "y",
                gpytorch.distributions.MultivariateNormal(torch.zeros(2, 6), covariance),
                obs=targets,
            )

    elbo = MaskedELBO(num_masks=2)
    loss = elbo.differentiable_loss(model, lambda *args: None, inputs, targets)
    loss.backward()
    assert kernel.base_kernel.raw_lengthscale.grad.shape == (2, 1, 1)
    assert (kernel.base_kernel.raw_lengthscale.grad != 0).all()
    # every mask enumerated: the cumulative score is the exact evidence, per output
    exact = Trace_ELBO().loss(model, lambda *args: None, inputs, targets)
    enumerated = MaskedELBO(num_masks="all").loss(model, lambda *args: None, inputs, targets)
    assert enumerated == pytest.approx(exact, abs=1e-8)


def test_covariance_not_positive_definite_names_the_site():
    def model():
        pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)), obs=torch.zeros(2))

    def broken(covariance=torch.tensor([[1.0, 2.0], [2.0, 1.0]])):
        d = dist.MultivariateNormal(torch.zeros(2), torch.eye(2))
        d.__dict__["covariance_matrix"] = covariance  # indefinite, past torch's own checks
        pyro.sample("x", d, obs=torch.zeros(2))

    MaskedELBO().loss(model, lambda: None)
    with (
        pytest.warns(Warning, match="jitter"),
        pytest.raises(ValueError, match="(?s)site 'x'.*positive"),
    ):
        MaskedELBO().loss(broken, lambda: None)


def _float32_model(data):
    loc = pyro.param("loc", torch.zeros(4, dtype=torch.float32))
    covariance = random_spd(4, generator=torch.Generator().manual_seed(2)).float()
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(loc, covariance), obs=data)


@pytest.mark.parametrize(
    "data",
    [torch.randn(5, 4, dtype=torch.float64), torch.randint(-3, 3, (5, 4))],
    ids=["float64", "int64"],
)
def test_data_of_another_dtype_is_accepted_as_in_trace_elbo(data):
    expected = Trace_ELBO().loss(_float32_model, empty_guide, data)
    loss = MaskedELBO(num_masks="all").loss(_float32_model, empty_guide, data)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_shape_error_names_the_site():
    with pytest.raises(ValueError, match=r"site 'x'[\s\S]*event shape"):
        MaskedELBO().loss(_float32_model, empty_guide, torch.randn(5, 3))


def test_positional_arguments_mean_what_they_mean_in_trace_elbo():
    elbo = MaskedELBO(4, 2)
    assert (elbo.num_particles, elbo.max_plate_nesting) == (4, 2)
    assert repr(elbo.mask) == "Cumulative()"
    reference = Trace_ELBO(4, 2)
    assert (reference.num_particles, reference.max_plate_nesting) == (4, 2)
    with pytest.raises(TypeError):
        MaskedELBO(4, 2, None, False, True, False, None, None, -1.0, "cumulative")


def _model_with_factor_deterministic_and_obs_mask(data, observed):
    loc = pyro.param("loc", torch.zeros(3))
    covariance = random_spd(3, generator=torch.Generator().manual_seed(5))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(loc, covariance), obs=data, obs_mask=observed)
        pyro.deterministic("doubled", 2 * data, event_dim=1)
        pyro.factor("penalty", -0.1 * (data - loc).square().sum(-1))


def test_default_sites_leave_factor_and_deterministic_sites_with_their_log_prob():
    data = torch.randn(6, 3)
    observed = torch.tensor([True, True, False, True, True, True])
    guide = AutoNormal(
        poutine.block(_model_with_factor_deterministic_and_obs_mask, hide=["doubled"])
    )
    args = (data, observed)
    trace = poutine.trace(guide).get_trace(*args)
    conditioned = poutine.replay(guide, trace)
    pyro.set_rng_seed(0)
    exact = Trace_ELBO().loss(_model_with_factor_deterministic_and_obs_mask, conditioned, *args)
    pyro.set_rng_seed(0)
    elbo = MaskedELBO(num_masks="all")
    masked = elbo.loss(_model_with_factor_deterministic_and_obs_mask, conditioned, *args)
    assert masked == pytest.approx(exact, abs=1e-8)
    loo = MaskedELBO(mask=1, num_masks="all").loss(
        _model_with_factor_deterministic_and_obs_mask, conditioned, *args
    )
    assert loo != pytest.approx(exact, abs=1e-2)  # the Gaussian site is masked
    with pytest.raises(TypeError, match="'penalty'.*Unit"):
        MaskedELBO(sites=["penalty"]).loss(
            _model_with_factor_deterministic_and_obs_mask, conditioned, *args
        )


def _contrib_gp_models():
    import pyro.contrib.gp as gp

    inputs = torch.linspace(0, 1, 8)[:, None]
    targets = torch.sin(6 * inputs[:, 0]) + 0.1 * torch.randn(8, generator=torch.Generator())
    inducing = inputs[::2].clone()

    def kernel():
        return gp.kernels.RBF(input_dim=1)

    return {
        "GPRegression": lambda: gp.models.GPRegression(inputs, targets, kernel()),
        **{
            f"SparseGPRegression-{approx}": (
                lambda approx=approx: gp.models.SparseGPRegression(
                    inputs, targets, kernel(), Xu=inducing, approx=approx
                )
            )
            for approx in ("DTC", "FITC", "VFE")
        },
        "VariationalGP": lambda: gp.models.VariationalGP(
            inputs, targets, kernel(), likelihood=gp.likelihoods.Gaussian()
        ),
        "VariationalSparseGP": lambda: gp.models.VariationalSparseGP(
            inputs, targets, kernel(), Xu=inducing, likelihood=gp.likelihoods.Gaussian()
        ),
    }


@pytest.mark.parametrize("name", list(_contrib_gp_models()))
def test_every_pyro_contrib_gp_model_trains_with_the_default_masked_elbo(name):
    import warnings

    from oracles import expected_masked_score

    from pyro_masked.infer import NothingToMaskWarning
    from pyro_masked.scoring import gaussian_parts

    model = _contrib_gp_models()[name]()
    exact = Trace_ELBO().loss(model.model, model.guide)
    trace = poutine.trace(model.model).get_trace()
    observed = trace.nodes["y"]["fn"] if "y" in trace.nodes else None
    if observed is not None:  # a Gaussian over the N function values: leave-p-out CV
        loc, covariance = gaussian_parts(observed)
        residual = model.y - loc
        oracle = expected_masked_score(covariance.detach(), residual.detach(), 1)
        log_prob = observed.log_prob(model.y).detach()
        loo = MaskedELBO(mask=1, num_masks="all").loss(model.model, model.guide)
        assert loo == pytest.approx(exact + float(log_prob - oracle), abs=1e-8)
        warning = None
    else:  # factorized likelihood given f: the masked loss is Trace_ELBO's, and it says so
        pyro.set_rng_seed(1)
        exact = Trace_ELBO().loss(model.model, model.guide)
        pyro.set_rng_seed(1)
        with pytest.warns(NothingToMaskWarning, match="likelihood.y.*integrate="):
            assert MaskedELBO().loss(model.model, model.guide) == exact
        warning = NothingToMaskWarning
    elbo = MaskedELBO()
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    with warnings.catch_warnings():
        if warning is not None:
            warnings.simplefilter("ignore", warning)
        losses = [svi.step() for _ in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    lengthscale = model.kernel.lengthscale
    assert torch.isfinite(lengthscale).all()


def test_nothing_to_mask_warns_once_and_only_then():
    import warnings

    from pyro_masked.infer import NothingToMaskWarning

    def factorized(data):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=data)
            pyro.sample("count", dist.Poisson(3.0), obs=torch.ones(data.shape[0]))

    data = torch.randn(4, 3)
    elbo = MaskedELBO()
    with pytest.warns(NothingToMaskWarning, match=r"\['x', 'count'\].*integrate="):
        elbo.loss(factorized, empty_guide, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        elbo.loss(factorized, empty_guide, data)  # once per loss object
        MaskedELBO().loss(ppca_model, empty_guide, torch.randn(10, 8))  # something masked

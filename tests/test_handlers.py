import pyro
import pyro.distributions as dist
import pytest
import torch
from oracles import random_spd
from pyro import poutine
from pyro.infer import (
    SVI,
    Predictive,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    config_enumerate,
)

from pyro_masked import MaskedScore, masked, masked_log_prob

COVARIANCE = random_spd(4, generator=torch.Generator().manual_seed(1)).double()


def gaussian_model(data):
    loc = pyro.param("loc", torch.zeros(4))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.MultivariateNormal(loc, COVARIANCE), obs=data)
        pyro.sample("y", dist.MultivariateNormal(loc, 2 * COVARIANCE), obs=data)


def test_observed_sites_are_rescored_by_the_masked_estimate():
    data = torch.randn(5, 4)
    pyro.set_rng_seed(3)
    trace = poutine.trace(masked(gaussian_model, mask=2)).get_trace(data)
    trace.compute_log_prob()
    pyro.set_rng_seed(3)
    d = dist.MultivariateNormal(torch.zeros(4), COVARIANCE)
    expected = masked_log_prob(d.expand([5]), data, mask=2)
    assert isinstance(trace.nodes["x"]["fn"], MaskedScore)
    assert torch.allclose(trace.nodes["x"]["log_prob"], expected)


def test_sites_not_chosen_keep_their_log_prob():
    data = torch.randn(5, 4)
    trace = poutine.trace(masked(gaussian_model, mask=2, sites=["y"])).get_trace(data)
    trace.compute_log_prob()
    exact = dist.MultivariateNormal(torch.zeros(4), COVARIANCE).log_prob(data)
    assert torch.equal(trace.nodes["x"]["log_prob"], exact)
    assert isinstance(trace.nodes["y"]["fn"], MaskedScore)


def test_latent_sites_and_sampling_are_unchanged():
    def model():
        z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)))
        pyro.sample("x", dist.MultivariateNormal(z, torch.eye(3)), obs=torch.ones(3))

    trace = poutine.trace(masked(model)).get_trace()
    assert not isinstance(trace.nodes["z"]["fn"], MaskedScore)
    samples = Predictive(masked(model), num_samples=7)()
    assert samples["z"].shape == (7, 3)


def test_usable_as_context_manager():
    data = torch.randn(3, 4)
    with masked(mask=0.5):
        trace = poutine.trace(gaussian_model).get_trace(data)
    assert isinstance(trace.nodes["x"]["fn"], MaskedScore)


@pytest.mark.parametrize(
    "elbo",
    [
        TraceGraph_ELBO(),
        RenyiELBO(alpha=0.5, num_particles=2),
        TraceEnum_ELBO(max_plate_nesting=1),
    ],
    ids=["TraceGraph", "Renyi", "TraceEnum"],
)
def test_composes_with_other_objectives(elbo):
    data = torch.randn(6, 4)

    @config_enumerate
    def model(data):
        weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
        locs = pyro.param("locs", torch.tensor([[-1.0] * 4, [1.0] * 4]))
        with pyro.plate("data", data.shape[0]):
            component = pyro.sample("component", dist.Categorical(weights))
            pyro.sample("x", dist.MultivariateNormal(locs[component], COVARIANCE), obs=data)

    def guide(data):
        concentration = pyro.param(
            "concentration", torch.ones(2), constraint=dist.constraints.positive
        )
        pyro.sample("weights", dist.Dirichlet(concentration))

    if isinstance(elbo, TraceEnum_ELBO):
        rescored, plain = model, model
    else:  # the other objectives sample the component: give the guide a site for it
        rescored = plain = poutine.block(model, hide=["component"])
        rescored = plain = poutine.condition(plain, data={"component": torch.zeros(6).long()})
    # every mask enumerated with the cumulative schedule is the exact log density
    pyro.set_rng_seed(0)
    expected = elbo.loss(plain, guide, data)
    pyro.set_rng_seed(0)
    loss = elbo.loss(masked(rescored, num_masks="all"), guide, data)
    assert loss == pytest.approx(expected, abs=1e-8)
    pyro.set_rng_seed(0)
    fixed_rate = elbo.loss(masked(rescored, mask=0.25), guide, data)
    assert fixed_rate != pytest.approx(expected, abs=1e-3)


def test_unsupported_site_names_the_site_and_the_way_out():
    def model():
        pyro.sample("proportions", dist.Dirichlet(torch.ones(3)), obs=torch.ones(3) / 3)

    with pytest.raises(TypeError, match=r"'proportions'.*Dirichlet.*sites=\[\.\.\.\]"):
        poutine.trace(masked(model)).get_trace()
    # leaving it out works
    poutine.trace(masked(model, sites=[])).get_trace()


def test_nan_observation_names_the_site():
    data = torch.randn(3, 4)
    data[1, 2] = float("nan")
    with pytest.raises(ValueError, match="site 'x'.*NaN"):
        poutine.trace(masked(gaussian_model)).get_trace(data)


def test_sites_naming_no_observed_site_is_an_error():
    with pytest.raises(ValueError, match="'typo'"):
        poutine.trace(masked(gaussian_model, sites=["x", "typo"])).get_trace(torch.randn(3, 4))


def test_mask_size_larger_than_the_event_names_the_site():
    with pytest.raises(ValueError, match="site 'x'.*outside 1..4"):
        poutine.trace(masked(gaussian_model, mask=5)).get_trace(torch.randn(3, 4))


def test_failed_step_leaves_parameters_unchanged():
    data = torch.randn(3, 4)
    svi = SVI(gaussian_model, lambda d: None, pyro.optim.Adam({"lr": 0.1}), loss=Trace_ELBO())
    svi.step(data)
    before = pyro.param("loc").detach().clone()
    bad = data.clone()
    bad[0, 0] = float("inf")
    rescored = SVI(
        masked(gaussian_model), lambda d: None, pyro.optim.Adam({"lr": 0.1}), Trace_ELBO()
    )
    with pytest.raises(ValueError, match="site 'x'"):
        rescored.step(bad)
    assert torch.equal(pyro.param("loc").detach(), before)


def test_string_sites_is_a_type_error():
    with pytest.raises(TypeError, match="list of site names"):
        masked(gaussian_model, sites="x")


class _TwoArgumentError(ValueError):
    """An exception whose constructor does not take a single message."""

    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")
        self.code = code


def test_error_with_another_constructor_keeps_its_type_and_names_the_site(monkeypatch):
    import pyro_masked.handlers as handlers

    def failing(*args, **kwargs):
        raise _TwoArgumentError(7, "not positive definite")

    monkeypatch.setattr(handlers, "_masked_log_prob", failing)
    trace = poutine.trace(masked(gaussian_model)).get_trace(torch.randn(3, 4))
    with pytest.raises(_TwoArgumentError) as info:
        trace.nodes["x"]["fn"].log_prob(torch.randn(3, 4))
    assert info.value.code == 7
    assert any("masked site 'x'" in note for note in info.value.__notes__)

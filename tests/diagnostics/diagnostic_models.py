"""Small models with known evidence, shared by the diagnostics tests."""

import pyro
import pyro.distributions as dist
import torch


def make_ppca(num_data=30, size=6, rank=2, seed=1):
    """A PPCA model with fixed parameters, its data, and its covariance."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(size, rank, generator=generator)
    covariance = weight @ weight.T + 0.3 * torch.eye(size)
    loc = torch.randn(size, generator=generator)
    data = torch.distributions.MultivariateNormal(loc, covariance).sample((num_data,))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.MultivariateNormal(loc, covariance), obs=x)

    return model, data, loc, covariance


def exact_log_marginal(loc, covariance, data):
    return float(dist.MultivariateNormal(loc, covariance).log_prob(data).sum())


def latent_bernoulli_model(x):
    """Local latents with Bernoulli observations: log p(x) has no closed form."""
    weight = torch.linspace(-1.0, 1.0, x.shape[-1])
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        logits = z.unsqueeze(-1) * weight
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def latent_bernoulli_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.1, 0.9))


def univariate_model(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def make_bernoulli_mixture(num_data=6, size=4, seed=2):
    """Binary vectors from a 3-component Bernoulli mixture: log p(x) by summing over z."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.tensor([0.2, 0.5, 0.3])
    probs = torch.rand(3, size, generator=generator)
    data = torch.bernoulli(torch.full((num_data, size), 0.5), generator=generator)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(mixing))
            pyro.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=x)

    joint = dist.Bernoulli(probs).to_event(1).log_prob(data[:, None, :]) + mixing.log()
    return model, data, float(joint.logsumexp(-1).sum())

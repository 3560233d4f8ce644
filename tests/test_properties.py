"""Properties of the masked score over event sizes 1..8, batch shapes, dtypes and mask sizes.

Hypothesis draws the cases (derandomized: the same cases on every run) and each is checked
against a plain reference: the exact log density, the brute-force oracle of
``tests/oracles.py`` (one conditioning per hidden coordinate and mask), or the mean of
independent random-mask draws.
"""

import math

import pyro.distributions as dist
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import expected_masked_score, random_spd

from pyro_masked import masked_log_prob
from pyro_masked.conditionals.latent import latent_masked_score
from pyro_masked.util import private_generator

PROPERTY_SETTINGS = settings(max_examples=15, derandomize=True, deadline=None, database=None)

BATCH_SHAPES = st.sampled_from([(), (1,), (3,), (2, 2)])
DTYPES = st.sampled_from([torch.float32, torch.float64])


@st.composite
def gaussian_cases(draw, max_size=8):
    size = draw(st.integers(1, max_size))
    batch_shape = draw(BATCH_SHAPES)
    dtype = draw(DTYPES)
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    covariance = random_spd(size, generator=generator).to(torch.float64)
    loc = torch.randn(size, generator=generator, dtype=torch.float64)
    value = loc + torch.randn(batch_shape + (size,), generator=generator, dtype=torch.float64)
    return dist.MultivariateNormal(loc.to(dtype), covariance.to(dtype)), value.to(dtype)


def _tolerance(dtype, scale):
    # float64: rounding only; float32: a D^2-term sum in single precision.
    return (1e-9 if dtype == torch.float64 else 2e-3) * max(1.0, float(scale))


@PROPERTY_SETTINGS
@given(gaussian_cases())
def test_every_mask_of_every_size_recovers_the_log_density(case):
    d, value = case
    score = masked_log_prob(d, value, num_masks="all")
    exact = d.log_prob(value)
    assert score.dtype == value.dtype and score.shape == exact.shape
    assert torch.allclose(score, exact, rtol=0, atol=_tolerance(value.dtype, exact.abs().max()))


@PROPERTY_SETTINGS
@given(gaussian_cases(max_size=6), st.data())
def test_fixed_size_equals_the_brute_force_oracle(case, data):
    d, value = case
    size = value.shape[-1]
    mask_size = data.draw(st.integers(1, size))
    score = masked_log_prob(d, value, mask=mask_size, num_masks="all")
    covariance = d.covariance_matrix.double()
    residuals = (value.double() - d.loc.double()).reshape(-1, size)
    oracle = torch.stack([expected_masked_score(covariance, r, mask_size) for r in residuals])
    oracle = oracle.reshape(value.shape[:-1])
    scale = oracle.abs().max()
    assert torch.allclose(score.double(), oracle, rtol=0, atol=_tolerance(value.dtype, scale))


@PROPERTY_SETTINGS
@given(
    st.integers(2, 8),
    st.one_of(st.just("cumulative"), st.integers(1, 8)),
    st.integers(0, 2**31 - 1),
)
def test_random_masks_are_unbiased_for_the_enumerated_value(size, mask, seed):
    if isinstance(mask, int):
        mask = min(mask, size)
    generator = torch.Generator().manual_seed(seed)
    d = dist.MultivariateNormal(torch.zeros(size), random_spd(size, generator=generator))
    vector = torch.randn(size, generator=generator)
    expected = masked_log_prob(d, vector, mask=mask, num_masks="all")
    # One vector repeated, each copy with its own permutation: independent draws.
    copies = 300
    draws = masked_log_prob(
        d,
        vector.expand(copies, size),
        mask=mask,
        mask_groups=copies,
        generator=private_generator(seed),
    )
    stderr = draws.std() / math.sqrt(copies)
    assert abs(draws.mean() - expected) <= 5 * stderr + 1e-9


@PROPERTY_SETTINGS
@given(st.integers(1, 7), st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_enumerated_latent_cumulative_over_every_mask_is_the_log_marginal(
    size, num_values, batch, seed
):
    generator = torch.Generator().manual_seed(seed)
    loglik = -3 * torch.rand(num_values, batch, size, generator=generator)
    log_weights = torch.log_softmax(torch.randn(num_values, batch, generator=generator), 0)
    score = latent_masked_score(loglik, log_weights, torch.ones(size), "all")
    exact = torch.logsumexp(log_weights + loglik.sum(-1), 0)
    assert torch.allclose(score, exact, rtol=0, atol=1e-10)

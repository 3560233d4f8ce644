import math

import pyro.distributions as dist
import pytest
import torch
from oracles import random_spd

from pyro_masked import masked_log_prob
from pyro_masked.util import (
    LOG_2PI,
    check_generator,
    check_mask_groups,
    check_sites,
    private_generator,
    unwrap,
)


def test_log_2pi():
    assert LOG_2PI == math.log(2 * math.pi)


def test_check_sites_refuses_a_string_and_names_the_argument():
    assert check_sites(None) is None
    assert check_sites(["x", "y"]) == ("x", "y")
    with pytest.raises(TypeError, match=r"integrate must be a list of site names.*\['x'\]"):
        check_sites("x", argument="integrate")
    with pytest.raises(TypeError, match="site names"):
        check_sites(["x", 3])
    with pytest.raises(TypeError, match="list of site names"):
        check_sites(3)


def test_check_mask_groups_and_generator():
    assert check_mask_groups(None) is None
    assert check_mask_groups(3) == 3
    with pytest.raises(ValueError, match="mask_groups"):
        check_mask_groups(0)
    with pytest.raises(TypeError, match="mask_groups"):
        check_mask_groups(2.0)
    with pytest.raises(TypeError, match="generator"):
        check_generator(0)


def test_private_generator_reproduces_without_touching_the_global_state():
    state = torch.get_rng_state()
    first = torch.rand(5, generator=private_generator(7))
    second = torch.rand(5, generator=private_generator(7))
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(first, torch.rand(5, generator=private_generator(8)))


def _wrapped_gaussians():
    generator = torch.Generator().manual_seed(0)
    mvn = dist.MultivariateNormal(torch.zeros(3), random_spd(3, generator=generator))
    mask = torch.tensor([True, False, True, True])
    yield mvn.expand([4]).to_event(1), (2, 4, 3)
    yield mvn.expand([4]).mask(mask), (2, 4, 3)
    yield mvn.expand([2, 4]).mask(mask).to_event(1), (2, 4, 3)
    yield mvn.expand([4]).to_event(1).mask(torch.tensor([True, False])), (2, 4, 3)
    yield dist.Normal(torch.zeros(4, 3), 1.0).mask(mask[:, None]).to_event(2), (2, 4, 3)


@pytest.mark.parametrize("d, shape", list(_wrapped_gaussians()))
def test_rewrap_of_the_base_log_prob_is_the_log_prob(d, shape):
    value = torch.randn(shape)
    unwrapped = unwrap(d)
    score = unwrapped.rewrap(unwrapped.base.log_prob(value))
    assert torch.allclose(score, d.log_prob(value))


def test_rewrap_without_summing_keeps_one_value_per_base_event_with_masks_applied():
    mask = torch.tensor([[True, False, True]])
    d = dist.Normal(torch.zeros(2, 3), 1.0).mask(mask).to_event(1)
    value = torch.randn(2, 3)
    unwrapped = unwrap(d)
    assert unwrapped.factorizes and unwrapped.has_mask
    coordinates = unwrapped.rewrap(unwrapped.base.log_prob(value), sum_events=False)
    expected = torch.where(mask, dist.Normal(0.0, 1.0).log_prob(value), torch.zeros(()))
    assert torch.allclose(coordinates, expected)
    copies = dist.MultivariateNormal(torch.zeros(3), torch.eye(3)).expand([2]).to_event(1)
    per_copy = unwrap(copies).rewrap(torch.ones(2), sum_events=False)
    assert per_copy.shape == (2,) and unwrap(copies).masked_event_size == 3
    assert unwrap(d).masked_event_size == 3


def test_generator_reproduces_masks_without_touching_the_global_state():
    d = dist.MultivariateNormal(torch.zeros(5), random_spd(5, generator=private_generator(1)))
    value = torch.randn(7, 5)
    state = torch.get_rng_state()
    first = masked_log_prob(d, value, generator=private_generator(3))
    second = masked_log_prob(d, value, generator=private_generator(3))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    assert not torch.equal(first, masked_log_prob(d, value, generator=private_generator(4)))


def test_mask_groups_draw_independent_permutations_per_group():
    d = dist.MultivariateNormal(torch.zeros(6), random_spd(6, generator=private_generator(1)))
    value = torch.randn(1, 6).expand(400, 6)
    exact = d.log_prob(value[0])
    shared = masked_log_prob(d, value, generator=private_generator(0))
    assert torch.all(shared == shared[0])  # one permutation for every copy
    groups = masked_log_prob(d, value, mask_groups=4, generator=private_generator(0))
    assert len(set(groups.tolist())) == 4
    assert torch.all(groups[:100] == groups[0]) and torch.all(groups[300:] == groups[300])
    per_vector = masked_log_prob(d, value, mask_groups=400, generator=private_generator(0))
    # 400 independent draws of an unbiased estimate: the mean within 4 standard errors.
    stderr = per_vector.std() / math.sqrt(len(per_vector))
    assert abs(per_vector.mean() - exact) < 4 * stderr
    assert per_vector.std() > 0

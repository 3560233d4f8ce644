import pytest
import torch

from pyro_masked.masks import Cumulative, FixedRate, FixedSize, SizeWeights, as_schedule


@pytest.mark.parametrize(
    "schedule",
    [Cumulative(), FixedSize(2), FixedRate(0.15), SizeWeights(lambda d: torch.arange(d, 0, -1))],
)
@pytest.mark.parametrize("event_size", [3, 7])
def test_size_weights_sum_to_event_size(schedule, event_size):
    weights = schedule.size_weights(event_size)
    assert weights.shape == (event_size,)
    assert torch.isclose(weights.sum(), torch.tensor(float(event_size), dtype=weights.dtype))


def test_context_weights_divide_size_weight_by_mask_size():
    weights = SizeWeights(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    context = weights.context_weights(4)
    size_weights = weights.size_weights(4)
    # context size k hides m = D - k coordinates
    for k in range(4):
        m = 4 - k
        assert torch.isclose(context[k], size_weights[m - 1] / m)


def test_fixed_rate_rounds_and_keeps_at_least_one():
    assert FixedRate(0.15).mask_size(10) == 2
    assert FixedRate(0.01).mask_size(10) == 1
    assert FixedRate(0.99).mask_size(4) == 4
    assert FixedRate(0.5).sizes(8) == [4]


def test_as_schedule_understands_the_public_spellings():
    assert isinstance(as_schedule("cumulative"), Cumulative)
    assert isinstance(as_schedule(3), FixedSize) and as_schedule(3).size == 3
    assert isinstance(as_schedule(0.15), FixedRate)
    schedule = FixedSize(1)
    assert as_schedule(schedule) is schedule


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_rate_outside_open_unit_interval_is_rejected(rate):
    with pytest.raises(ValueError, match="rate"):
        as_schedule(rate)


def test_bad_sizes_and_spellings_are_rejected():
    with pytest.raises(ValueError, match="size must be >= 1"):
        FixedSize(0)
    with pytest.raises(ValueError, match="outside 1..3"):
        FixedSize(4).size_weights(3)
    with pytest.raises(ValueError, match="not understood"):
        as_schedule("bert")
    with pytest.raises(TypeError):
        as_schedule(True)
    with pytest.raises(TypeError):
        as_schedule([1, 2])


def test_size_weights_validation():
    with pytest.raises(ValueError, match="expected 3 weights"):
        SizeWeights(lambda d: torch.ones(d + 1)).size_weights(3)
    with pytest.raises(ValueError, match="non-negative"):
        SizeWeights(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="not all be zero"):
        SizeWeights(torch.zeros(3))


@pytest.mark.parametrize("scale", [1e308, 1e-320])
def test_size_weights_of_extreme_magnitude_normalise(scale):
    # Their sum overflows (or each underflows on its own), which made every weight zero.
    weights = SizeWeights([scale, scale, 0.0]).size_weights(3)
    assert torch.allclose(weights, torch.tensor([1.5, 1.5, 0.0], dtype=weights.dtype))


@pytest.mark.parametrize("event_size, expected", [(5, 3), (7, 4), (9, 5), (3, 2), (1, 1)])
def test_fixed_rate_rounds_halves_up(event_size, expected):
    # Round half to even gave 2, 4 and 4 for 5, 7 and 9 coordinates.
    assert FixedRate(0.5).mask_size(event_size) == expected


def test_fixed_rate_rounds_decimal_halves_as_written():
    assert FixedRate(0.35).mask_size(10) == 4  # 0.35 * 10 is 3.4999999999999996 in binary
    assert FixedRate(0.15).mask_size(10) == 2
    assert FixedRate(0.25).mask_size(10) == 3
    assert FixedRate(0.24).mask_size(10) == 2


def test_context_weights_function_is_the_schedules_formula():
    from pyro_masked.masks import context_weights, count_masks

    schedule = SizeWeights(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(context_weights(schedule.size_weights(4)), schedule.context_weights(4))
    assert count_masks(5, [1, 2, 5]) == 5 + 10 + 1

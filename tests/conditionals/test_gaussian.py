import gc
import math

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from oracles import LargestAllocation, expected_masked_score, permutation_score, random_spd

import pyro_masked.conditionals.gaussian as gaussian
from pyro_masked import masked_log_prob
from pyro_masked.masks import Cumulative, FixedSize, SizeWeights


def _context_weights(size):
    return SizeWeights(lambda d: torch.rand(d) + 0.1).context_weights(size)


@pytest.mark.parametrize("size", [1, 2, 5, 7])
@pytest.mark.parametrize("num_vectors", [1, 3, 12])
def test_fast_path_equals_one_conditioning_per_mask(size, num_vectors):
    covariance = random_spd(size)
    residuals = torch.randn(num_vectors, size)
    weights = _context_weights(size)
    perms = gaussian.random_permutations(2, size)
    # n = 12 takes the quadratic form for every size here; n = 1 the residual form.
    fast = gaussian._permuted_scores(covariance[None], residuals[None], weights, perms)[0]
    for n in range(num_vectors):
        expected = sum(permutation_score(covariance, residuals[n], p, weights) for p in perms) / 2
        assert torch.allclose(fast[n], expected, atol=1e-10, rtol=1e-10)


def test_residual_and_quadratic_forms_agree(monkeypatch):
    size = 9
    covariance = random_spd(size)
    residuals = torch.randn(4, 6, size)
    perms = gaussian.random_permutations(3, size)
    weights = _context_weights(size)
    cov = covariance.expand(4, size, size) * torch.arange(1.0, 5.0)[:, None, None]
    monkeypatch.setattr(gaussian, "_QUADRATIC_FORM_SIZE_PER_VECTOR", 10**9)  # n >= 2: quadratic
    quadratic = gaussian._permuted_scores(cov, residuals, weights, perms)
    monkeypatch.setattr(gaussian, "_QUADRATIC_FORM_SIZE_PER_VECTOR", 1)  # n < D: residual
    residual = gaussian._permuted_scores(cov, residuals, weights, perms)
    assert torch.allclose(quadratic, residual, atol=1e-10)


@pytest.mark.parametrize("block", [1, 2, 3, 128])
def test_row_blocking_does_not_change_the_score(monkeypatch, block):
    size = 7
    factor = torch.linalg.cholesky(random_spd(size))[None]
    whitened = torch.randn(1, 2, size)
    weights = _context_weights(size)
    reference = gaussian._ResidualFormScore.apply(factor, whitened, weights)
    monkeypatch.setattr(gaussian, "_ROW_BLOCK", block)
    blocked = gaussian._ResidualFormScore.apply(factor, whitened, weights)
    assert torch.allclose(reference, blocked, atol=1e-12)


@pytest.mark.parametrize("block", [2, 128])
def test_residual_form_gradcheck(monkeypatch, block):
    monkeypatch.setattr(gaussian, "_ROW_BLOCK", block)
    size = 5
    factor = torch.linalg.cholesky(random_spd(size)).requires_grad_()
    whitened = torch.randn(2, 3, size, requires_grad=True)
    weights = _context_weights(size)

    def score(factor, whitened):
        stacked = torch.stack([factor.tril(), 1.5 * factor.tril()])
        return gaussian._ResidualFormScore.apply(stacked, whitened, weights)

    assert torch.autograd.gradcheck(score, (factor, whitened))


def _quadratic_form_by_autograd(factor, weights):
    """The quadratic form's parts from their definition, differentiated by autograd."""
    size = factor.shape[-1]
    lower = torch.ones(size, size, dtype=torch.bool).tril()
    variance = torch.where(lower, factor.square().flip(-1).cumsum(-1).flip(-1), 1.0)
    block_weights = weights * lower
    constant = -0.5 * (block_weights * (variance.log() + math.log(2 * math.pi))).sum((-1, -2))
    omega = (block_weights / variance).cumsum(-1)
    upper = ((omega * factor).mT @ factor).triu()
    matrix = upper + upper.triu(1).mT
    inverse = torch.linalg.inv(factor)
    return constant, inverse.mT @ matrix @ inverse


def _permuted_parts_by_autograd(covariance, perms, weights):
    """The quadratic form's parts of every permutation, by torch's Cholesky and autograd."""
    constants, matrices = [], []
    for group in range(covariance.shape[0]):
        group_perms = perms[group if perms.shape[0] > 1 else 0]
        for perm in group_perms:
            inverse = torch.argsort(perm)
            factor = torch.linalg.cholesky(covariance[group][perm][:, perm])
            constant, matrix = _quadratic_form_by_autograd(factor, weights)
            constants.append(constant)
            matrices.append(matrix[inverse][:, inverse] / len(group_perms))
    num_perms = perms.shape[1]
    matrices = torch.stack(matrices).view(-1, num_perms, *covariance.shape[-2:]).sum(1)
    return torch.stack(constants).view(-1, num_perms), matrices


@pytest.mark.parametrize(
    "tile, part_elements, select", [(2, 14, 64), (3, 2**15, 0), (128, 10, 64), (128, 2**15, 0)]
)
@pytest.mark.parametrize("blocked", [False, True])
@pytest.mark.parametrize("num_perms, shared", [(1, True), (3, True), (2, False)])
def test_permuted_quadratic_parts_match_autograd_and_gradcheck(
    monkeypatch, tile, part_elements, select, blocked, num_perms, shared
):
    monkeypatch.setattr(gaussian, "_PRODUCT_ROWS", tile)
    # Row blocks of the elementwise passes: 2 rows, 1 row, or the whole matrix.
    monkeypatch.setattr(gaussian, "_PART_ELEMENTS", part_elements)
    # Gathers one matrix at a time by flat indices, or batched.
    monkeypatch.setattr(gaussian, "_SELECT_MATRICES", select)
    # blocked: the factor's gradient is formed and handed to the blocked Cholesky backward;
    # otherwise the two backward passes are merged.
    monkeypatch.setattr(gaussian, "_BLOCKED_BACKWARD_SIZE", 2 if blocked else 10**9)
    monkeypatch.setattr(gaussian, "_CHOLESKY_BLOCK", 3)
    size = 7
    root = torch.randn(2, size, size, requires_grad=True)
    weights = _context_weights(size)
    perms = gaussian.random_permutations(num_perms, size, num_groups=1 if shared else 2)
    # The matrix is symmetric and so is the gradient it receives (the quadratic forms').
    asymmetric = torch.randn(2, size, size)
    cotangents = torch.randn(2, num_perms), asymmetric + asymmetric.mT

    def covariance(root):
        return root @ root.mT + torch.eye(size)

    def symmetrised_parts(root):
        constant, matrix = gaussian._PermutedQuadraticParts.apply(covariance(root), perms, weights)
        return constant, (matrix + matrix.mT) / 2

    fast = gaussian._PermutedQuadraticParts.apply(covariance(root), perms, weights)
    reference = _permuted_parts_by_autograd(covariance(root), perms, weights)
    for part, expected in zip(fast, reference):
        assert torch.allclose(part, expected, atol=1e-10)
    fast_grad = torch.autograd.grad(sum((p * c).sum() for p, c in zip(fast, cotangents)), root)
    reference_grad = torch.autograd.grad(
        sum((p * c).sum() for p, c in zip(reference, cotangents)), root
    )
    assert torch.allclose(fast_grad[0], reference_grad[0], atol=1e-9)
    assert torch.autograd.gradcheck(symmetrised_parts, (root,))


@pytest.mark.parametrize("tile", [1, 3, 128])
def test_quadratic_forms_from_the_upper_triangle_equal_the_plain_ones(monkeypatch, tile):
    monkeypatch.setattr(gaussian, "_FORM_COLUMNS", tile)
    root = torch.randn(2, 7, 7)
    matrix = (root + root.mT).requires_grad_()
    residuals = torch.randn(2, 5, 7)
    expected = ((residuals @ matrix) * residuals).sum(-1)
    assert torch.allclose(gaussian._symmetric_quadratic_forms(residuals, matrix), expected)
    # The triangle path (residuals without gradient) and the full one (with) agree, gradients too.
    fixed = gaussian._QuadraticForms.apply(matrix, residuals, None)
    free = gaussian._QuadraticForms.apply(matrix, residuals.clone().requires_grad_(), None)
    assert torch.allclose(fixed, expected) and torch.allclose(free, expected)
    (grad_fixed,) = torch.autograd.grad(fixed.sum(), matrix)
    (grad_free,) = torch.autograd.grad(free.sum(), matrix)
    assert torch.allclose(grad_fixed, grad_free)


@pytest.mark.parametrize("tile", [1, 2, 3, 128])
def test_blocked_triangular_products_equal_the_plain_products(monkeypatch, tile):
    monkeypatch.setattr(gaussian, "_PRODUCT_ROWS", tile)
    lower, other = torch.randn(2, 7, 7).tril(), torch.randn(2, 7, 7)
    left, right = torch.randn(2, 7, 7), torch.randn(2, 7, 7)
    assert torch.allclose(
        gaussian._lower_of_transposed_product(lower, other), (lower.mT @ other).tril()
    )
    # Only the part of ``other`` the product names may be read: the rest is not zero here.
    assert torch.allclose(
        gaussian._lower_times_upper_part(lower, other), (lower @ other.triu()).tril()
    )
    assert torch.allclose(
        gaussian._lower_times_strictly_lower_part(lower, other), lower @ other.tril(-1)
    )
    assert torch.allclose(
        gaussian._lower_of_transposed_product_minus(lower, other.tril(), left, right),
        (lower.mT @ other.tril() - left @ right).tril(),
    )


@pytest.mark.parametrize("num_perms", [1, 3])
@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("blocked", [True, False])
def test_permuted_cholesky_matches_autograd_through_torch(monkeypatch, num_perms, select, blocked):
    monkeypatch.setattr(gaussian, "_SELECT_MATRICES", 64 if select else 0)
    monkeypatch.setattr(gaussian, "_BLOCKED_BACKWARD_SIZE", 2 if blocked else 10**9)
    monkeypatch.setattr(gaussian, "_CHOLESKY_BLOCK", 4)
    size = 6
    root = torch.randn(2, size, size, requires_grad=True)
    perms = gaussian.random_permutations(num_perms, size)
    cotangent = torch.randn(2, num_perms, size, size).tril()

    def covariance(root):
        return root @ root.mT + torch.eye(size)

    fast = gaussian._PermutedCholesky.apply(covariance(root), perms)
    (fast_grad,) = torch.autograd.grad((fast * cotangent).sum(), root)
    permuted = torch.stack([covariance(root)[:, p][:, :, p] for p in perms], 1)
    reference = torch.linalg.cholesky(permuted)
    (reference_grad,) = torch.autograd.grad((reference * cotangent).sum(), root)
    assert torch.allclose(fast, reference, atol=1e-12)
    assert torch.allclose(fast_grad, reference_grad, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda r: gaussian._PermutedCholesky.apply(covariance(r), perms), (root,)
    )


@pytest.mark.parametrize("block", [1, 2, 3, 4, 128])
def test_blocked_cholesky_backward_equals_autograd_through_torch(monkeypatch, block):
    monkeypatch.setattr(gaussian, "_BLOCKED_BACKWARD_SIZE", 2)
    monkeypatch.setattr(gaussian, "_CHOLESKY_BLOCK", block)
    size = 7
    root = torch.randn(2, 3, size, size)
    covariance = (root @ root.mT + torch.eye(size)).requires_grad_()
    factor = torch.linalg.cholesky(covariance)
    cotangent = torch.randn_like(factor)  # entries above the diagonal must be ignored
    (expected,) = torch.autograd.grad(factor, covariance, cotangent)
    fast = gaussian._cholesky_backward(factor.detach(), cotangent)
    assert torch.allclose(fast, (expected + expected.mT) / 2, atol=1e-12)
    assert torch.equal(fast, fast.mT)


@pytest.mark.parametrize("tile", [1, 2, 4, 256])
def test_tiled_mirror_equals_the_plain_one(monkeypatch, tile):
    monkeypatch.setattr(gaussian, "_TILE", tile)
    lower = torch.randn(2, 7, 7).tril()
    assert torch.equal(gaussian._mirror_lower_triangle(lower.clone()), lower + lower.mT)


@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("flat", [True, False])
def test_gathers_by_the_inverse_permutations_undo_the_permutations(monkeypatch, select, flat):
    monkeypatch.setattr(gaussian, "_SELECT_MATRICES", 64 if select else 0)
    matrix = torch.randn(1, 6, 6)
    perms = gaussian.random_permutations(4, 6)[None]
    inverse = torch.argsort(perms, dim=-1)
    indices = (
        (gaussian._flat_indices(perms), gaussian._flat_indices(inverse)) if flat else (None,) * 2
    )
    # The whole index is built only for gathers one matrix at a time.
    assert (indices[0] is None) == (not (flat and select))
    permuted = gaussian._gather_symmetric(matrix, perms, flat=indices[0])
    for s, perm in enumerate(perms[0]):
        assert torch.equal(permuted[0, s], matrix[0][perm][:, perm])
    total = gaussian._gather_symmetric(permuted, inverse, reduce=True, flat=indices[1])
    assert torch.equal(total, 4 * matrix)
    symmetric = matrix + matrix.mT
    fast = gaussian._gather_symmetric(symmetric, perms, symmetric=True, flat=indices[0])
    assert torch.equal(fast, gaussian._gather_symmetric(symmetric, perms))


def test_flat_indices_are_left_to_the_chunks_for_large_matrices(monkeypatch):
    perms = gaussian.random_permutations(2, 6)[None]
    assert gaussian._flat_indices(perms).shape == (1, 2, 36)
    monkeypatch.setattr(gaussian, "_GATHER_ELEMENTS", 35)
    assert gaussian._flat_indices(perms) is None


@pytest.mark.parametrize("elements", [1, 7, 20, 2**18])
def test_flat_gathers_by_chunks_equal_row_and_column_selection(monkeypatch, elements):
    monkeypatch.setattr(gaussian, "_GATHER_ELEMENTS", elements)
    matrix = torch.randn(7, 7, dtype=torch.float64)
    perm = torch.randperm(7)
    out = torch.empty_like(matrix)
    gaussian._permute_into(out, matrix, perm, symmetric=False)
    assert torch.equal(out, matrix[perm][:, perm])
    # A transposed layout: copied when the matrix may be asymmetric, read as it lies when not.
    gaussian._permute_into(out, matrix.mT, perm, symmetric=False)
    assert torch.equal(out, matrix.mT[perm][:, perm])
    symmetric = matrix + matrix.mT
    gaussian._permute_into(out, symmetric.mT, perm, symmetric=True)
    assert torch.equal(out, symmetric[perm][:, perm])


@pytest.mark.parametrize("size", [1, 3, 5])
def test_every_mask_enumerated_equals_plain_enumeration(size):
    covariance = random_spd(size)
    residuals = torch.randn(1, 2, size)
    for mask_size in range(1, size + 1):
        weights = FixedSize(mask_size).size_weights(size)
        score = gaussian.gaussian_masked_score(covariance[None], residuals, weights, "all")
        for n in range(2):
            expected = expected_masked_score(covariance, residuals[0, n], mask_size)
            assert torch.allclose(score[0, n], expected, atol=1e-10)


def test_leave_one_out_closed_form_equals_enumeration():
    covariance = random_spd(6)
    residuals = torch.randn(1, 3, 6)
    loo = gaussian.leave_one_out_score(covariance[None], residuals)
    for n in range(3):
        assert torch.allclose(loo[0, n], expected_masked_score(covariance, residuals[0, n], 1))


def test_cumulative_all_masks_is_the_exact_log_density():
    covariance = random_spd(6)
    residuals = torch.randn(1, 4, 6)
    weights = Cumulative().size_weights(6)
    score = gaussian.gaussian_masked_score(covariance[None], residuals, weights, "all")
    exact = torch.distributions.MultivariateNormal(torch.zeros(6), covariance).log_prob(residuals)
    assert torch.allclose(score, exact, atol=1e-10)


def test_many_permutations_use_one_batched_factorization(monkeypatch):
    calls = []
    original = gaussian.cholesky

    def spy(matrix, **kwargs):
        calls.append(matrix.shape)
        return original(matrix, **kwargs)

    monkeypatch.setattr(gaussian, "cholesky", spy)
    weights = Cumulative().size_weights(5)
    gaussian.gaussian_masked_score(random_spd(5)[None], torch.randn(1, 2, 5), weights, 16)
    assert calls == [torch.Size([1, 16, 5, 5])]


@pytest.mark.filterwarnings("ignore:A not p.d., added jitter")
def test_not_positive_definite_is_a_clear_error():
    covariance = -torch.eye(3)[None]
    weights = Cumulative().size_weights(3)
    with pytest.raises(ValueError, match="not positive definite"):
        gaussian.gaussian_masked_score(covariance, torch.randn(1, 1, 3), weights, 1)


def test_nan_covariance_is_a_clear_error():
    covariance = random_spd(3)
    covariance[0, 1] = covariance[1, 0] = float("nan")
    weights = Cumulative().size_weights(3)
    with pytest.raises(ValueError, match="contains NaN"):
        gaussian.gaussian_masked_score(covariance[None], torch.randn(1, 1, 3), weights, 1)


def _size_and_context_weights(size):
    size_weights = torch.rand(size) + 0.1
    size_weights = size * size_weights / size_weights.sum()
    return size_weights, size_weights.flip(0) / torch.arange(size, 0, -1)


@pytest.mark.parametrize("mask_groups", [1, 3, 5, 14, 40])
def test_mask_groups_score_each_group_with_its_own_permutations(mask_groups):
    size, batch, num_vectors, num_perms = 5, 2, 7, 2
    covariance = torch.stack([random_spd(size), random_spd(size)])
    residuals = torch.randn(batch, num_vectors, size)
    size_weights, context_weights = _size_and_context_weights(size)
    score = gaussian.gaussian_masked_score(
        covariance,
        residuals,
        size_weights,
        num_perms,
        mask_groups=mask_groups,
        generator=torch.Generator().manual_seed(3),
    )
    # The groups' permutations, drawn as documented; vectors split in order into equal groups.
    num_groups = min(mask_groups, batch * num_vectors)
    perms = gaussian.random_permutations(
        num_perms, size, num_groups=num_groups, generator=torch.Generator().manual_seed(3)
    )
    for b in range(batch):
        for n in range(num_vectors):
            group = (b * num_vectors + n) * num_groups // (batch * num_vectors)
            expected = sum(
                permutation_score(covariance[b], residuals[b, n], p, context_weights)
                for p in perms[group]
            )
            assert torch.allclose(score[b, n], expected / num_perms, atol=1e-10)


def test_mask_groups_gradcheck():
    size = 4
    factor = torch.randn(size, size, requires_grad=True)
    residuals = torch.randn(1, 5, size, requires_grad=True)
    size_weights, _ = _size_and_context_weights(size)

    def score(factor, residuals):
        covariance = (factor @ factor.T + torch.eye(size))[None]
        return gaussian.gaussian_masked_score(
            covariance,
            residuals,
            size_weights,
            2,
            mask_groups=3,
            generator=torch.Generator().manual_seed(0),
        )

    assert torch.autograd.gradcheck(score, (factor, residuals))


def test_generator_draws_the_masks_and_leaves_the_global_generator_alone():
    d = torch.distributions.MultivariateNormal(torch.zeros(6), random_spd(6))
    value = torch.randn(3, 6)
    state = torch.get_rng_state()
    first = masked_log_prob(d, value, generator=torch.Generator().manual_seed(5), mask_groups=3)
    second = masked_log_prob(d, value, generator=torch.Generator().manual_seed(5), mask_groups=3)
    other = masked_log_prob(d, value, generator=torch.Generator().manual_seed(6), mask_groups=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second) and not torch.equal(first, other)
    shared = masked_log_prob(d, value, generator=torch.Generator().manual_seed(5))
    assert torch.equal(
        shared, masked_log_prob(d, value, generator=torch.Generator().manual_seed(5))
    )
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "mask_groups, error, match",
    [(0, ValueError, "mask_groups must be None or an int >= 1"), (2.0, TypeError, "mask_groups")],
)
def test_bad_mask_groups_is_a_clear_error(mask_groups, error, match):
    d = torch.distributions.MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(error, match=match):
        masked_log_prob(d, torch.randn(2, 3), mask_groups=mask_groups)


def test_bad_generator_is_a_clear_error():
    d = torch.distributions.MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(TypeError, match="generator must be None or a torch.Generator"):
        masked_log_prob(d, torch.randn(2, 3), generator=0)


def _relative_errors_of_the_sum(d, mask_groups, sizes, repeats=60):
    """Spread over mask draws of the estimate of sum_n log p(x_n), over |sum_n log p(x_n)|."""
    errors = []
    for num_points in sizes:
        value = d.sample((num_points,))
        exact = d.log_prob(value).sum()
        generator = torch.Generator().manual_seed(1)
        groups = None if mask_groups is None else num_points
        estimates = torch.stack(
            [
                masked_log_prob(d, value, mask_groups=groups, generator=generator).sum()
                for _ in range(repeats)
            ]
        )
        standard_error = estimates.std() / repeats**0.5
        assert abs(estimates.mean() - exact) < 4 * standard_error  # unbiased either way
        errors.append(estimates.std() / exact.abs())
    return errors


def test_relative_error_of_a_sum_falls_like_one_over_root_n_with_per_vector_groups():
    # N grows 16-fold: independent per-vector permutations shrink the relative error of the
    # sum 4-fold; shared permutations (the default, the negative control) do not shrink it.
    d = torch.distributions.MultivariateNormal(torch.zeros(6), random_spd(6))
    small, large = _relative_errors_of_the_sum(d, "per vector", [50, 800])
    # The spread ratio of 60 draws has a relative standard error of about 13%: 4 +- 3 of them.
    assert 2.4 < small / large < 5.6
    small, large = _relative_errors_of_the_sum(d, None, [50, 800])
    assert small / large < 1.6


@pytest.mark.parametrize("expanded", [False, True])
def test_plate_expanded_covariance_allocates_nothing_of_size_n_d_squared(expanded):
    # A covariance built outside pyro.plate is expanded over the plate: its backward must not
    # materialise the (N, D, D) gradient of the expanded view.
    num_points, size = 300, 16
    factor = torch.randn(size, 3, requires_grad=True)
    value = torch.randn(num_points, size)
    with LargestAllocation() as recorder:
        d = torch.distributions.MultivariateNormal(
            torch.zeros(size), factor @ factor.T + torch.eye(size)
        )
        if expanded:
            d = d.expand([num_points])
        masked_log_prob(d, value, num_masks=2).sum().backward()
    assert recorder.largest_bytes <= num_points * size * 8  # the data's size, not N D^2


@pytest.mark.parametrize("view", ["expand", "transposed base", "batched base"])
def test_expanded_covariance_gives_the_same_scores_and_gradients(view):
    size, num_points = 5, 6
    factor = torch.randn(size, size, requires_grad=True)
    loc = torch.randn(size, requires_grad=True)
    value = torch.randn(2, num_points, size)

    def scores_and_gradients(expand):
        factor.grad = loc.grad = None
        covariance = factor @ factor.T + torch.eye(size)
        if view == "transposed base":
            covariance = covariance.T  # a view of a view: its storage is not a plain broadcast
        batch_loc = loc
        if view == "batched base":
            covariance = torch.stack([covariance, 2 * covariance])[:, None]  # (2, 1, D, D)
            batch_loc = loc.expand(2, 1, size)
        d = torch.distributions.MultivariateNormal(batch_loc, covariance)
        if expand:
            d = d.expand([2, num_points])
        score = masked_log_prob(d, value, num_masks=3, generator=torch.Generator().manual_seed(0))
        (
            score * torch.rand(score.shape, generator=torch.Generator().manual_seed(1))
        ).sum().backward()
        return score.detach(), factor.grad.clone(), loc.grad.clone()

    for got, expected in zip(scores_and_gradients(True), scores_and_gradients(False)):
        assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("refill", ["data.copy_", "numpy array rewritten"])
def test_data_refilled_without_a_version_bump_gives_the_right_gradient(refill):
    # The backward pass of a plate of vectors reuses the data's scatter while the data is
    # unchanged; a buffer refilled behind autograd's back must not reuse a stale one.
    size, num_points = 4, 30
    factor = torch.randn(size, 2, requires_grad=True)
    loc = torch.randn(size, requires_grad=True)
    array = np.random.default_rng(0).normal(size=(num_points, size))
    observed = torch.from_numpy(array)
    new_values = torch.randn(num_points, size)

    def gradients(value):
        factor.grad = loc.grad = None
        d = torch.distributions.MultivariateNormal(loc, factor @ factor.T + torch.eye(size))
        generator = torch.Generator().manual_seed(0)
        masked_log_prob(d, value, num_masks=2, generator=generator).sum().backward()
        return factor.grad.clone(), loc.grad.clone()

    gradients(observed)
    gradients(observed)  # the second use caches the data's scatter
    version = observed._version
    if refill == "data.copy_":
        observed.data.copy_(new_values)
    else:
        array[...] = new_values.numpy()
    assert observed._version == version and torch.equal(observed, new_values)
    for got, expected in zip(gradients(observed), gradients(new_values.clone())):
        assert torch.allclose(got, expected, atol=1e-10)


def test_cached_data_scatter_is_released_with_the_data():
    from pyro_masked.scoring import _ResidualScatter

    factor = torch.randn(3, 3, requires_grad=True)
    value = torch.randn(20, 3)
    for _ in range(2):  # the second use caches the data's scatter
        covariance = factor @ factor.T + torch.eye(3)
        d = torch.distributions.MultivariateNormal(torch.zeros(3), covariance)
        masked_log_prob(d, value).sum().backward()
    key = id(value)
    assert key in _ResidualScatter._entries
    del value
    gc.collect()
    assert key not in _ResidualScatter._entries


def test_enumerating_masks_beyond_the_memory_limit_is_a_clear_error():
    # D = 200 with mask size 2: 19,900 masks (under the mask-count limit) of 200 x 200
    # covariances would be 6.4 GB; it must fail before allocating anything of that size.
    size = 200
    d = torch.distributions.MultivariateNormal(torch.zeros(size), torch.eye(size))
    with LargestAllocation() as recorder, pytest.raises(ValueError, match="5.93 GiB"):
        masked_log_prob(d, torch.randn(size), mask=2, num_masks="all")
    assert recorder.largest_bytes < 2**20
    assert gaussian.enumeration_bytes(size, [2]) == 19_900 * size * size * 8
    assert not gaussian.enumeration_fits(size, [2])
    assert gaussian.enumeration_fits(30, [2])  # 435 masks of 30 x 30


@requires_cuda
def test_accelerator_scores_and_gradients_equal_the_cpus():
    # On an accelerator the backward pass uses no cached scatter (and no device sync to check
    # it): the result must still be the CPU's.
    num_points, size = 50, 6

    def scores_and_gradient(device):
        factor = torch.randn(size, 2, generator=torch.Generator().manual_seed(0)).to(device)
        factor.requires_grad_()
        value = torch.randn(num_points, size, generator=torch.Generator().manual_seed(1))
        d = torch.distributions.MultivariateNormal(
            torch.zeros(size, device=device), factor @ factor.T + torch.eye(size, device=device)
        ).expand([num_points])
        generator = torch.Generator().manual_seed(2)  # a CPU generator serves any device
        score = masked_log_prob(d, value.to(device), num_masks=3, generator=generator)
        score.sum().backward()
        return score.cpu(), factor.grad.cpu()

    for got, expected in zip(scores_and_gradient("cuda"), scores_and_gradient("cpu")):
        assert torch.allclose(got, expected, atol=1e-8)

import pytest
import torch
from linear_operator.utils.errors import NanError, NotPSDError

from pyro_masked.linalg import NonFiniteMatrixError, NotPositiveDefiniteError, cholesky

# The indefinite matrices are indefinite on purpose: the jitter attempts warn before the error.
pytestmark = pytest.mark.filterwarnings(
    "ignore:A not p.d.:linear_operator.utils.warnings.NumericalWarning"
)


def test_cholesky_of_a_positive_definite_batch_is_torchs_factor():
    root = torch.randn(3, 5, 5)
    matrix = root @ root.mT + 0.1 * torch.eye(5)
    factor = cholesky(matrix, what="the test matrix")
    torch.testing.assert_close(factor, torch.linalg.cholesky(matrix))


def test_cholesky_adds_jitter_to_a_singular_psd_matrix():
    column = torch.randn(4, 1)
    matrix = column @ column.mT  # rank one: positive semidefinite, not definite
    factor = cholesky(matrix, what="the test matrix")
    torch.testing.assert_close(factor @ factor.mT, matrix, atol=1e-6, rtol=0)


def test_indefinite_matrix_raises_an_error_gpytorch_and_botorch_catch_and_names_it():
    matrix = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(NotPositiveDefiniteError, match="the covariance of site 'x'.*duplicate"):
        cholesky(matrix, what="the covariance of site 'x'", hint="(duplicate inputs?)")
    with pytest.raises(NotPSDError):
        cholesky(matrix, what="m")
    with pytest.raises(ValueError):
        cholesky(matrix, what="m")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_matrix_raises_a_nan_error_naming_it(bad):
    matrix = torch.eye(3)
    matrix[1, 0] = matrix[0, 1] = bad
    with pytest.raises(NonFiniteMatrixError, match="the GP's covariance contains"):
        cholesky(matrix, what="the GP's covariance")
    with pytest.raises(ValueError):
        cholesky(matrix, what="m")
    with pytest.raises(NanError):
        cholesky(matrix, what="m")

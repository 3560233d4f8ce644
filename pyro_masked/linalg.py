"""One jitter-safe Cholesky factorization for the whole package, with errors that say what failed.

Every covariance the package factors (a site's Gaussian, a GP's target covariance, each
permuted copy of it) goes through :func:`cholesky`. It is linear_operator's
:func:`~linear_operator.utils.cholesky.psd_safe_cholesky` (the factorization GPyTorch uses:
jitter is added to the diagonal, growing tenfold per try, only for the batch members that need
it), with its failures re-raised as errors that name the matrix:

- :class:`NotPositiveDefiniteError` when the matrix stays indefinite after the jitter. It is a
  :class:`~linear_operator.utils.errors.NotPSDError`, so code written for GPyTorch handles it
  as it handles GPyTorch's own failure (BoTorch's ``fit_gpytorch_mll`` restarts from new
  hyperparameters), and a :class:`ValueError`, the package's error for bad values.
- :class:`NonFiniteMatrixError` when the matrix holds NaN or infinite entries (the parameters
  are not finite).
  It is a :class:`~linear_operator.utils.errors.NanError` (BoTorch's SciPy closure then reports
  a NaN loss, so the line search steps back) and a :class:`ValueError`.

Cost: :math:`O(D^3)` per matrix, one more factorization per jitter try.
"""

from __future__ import annotations

from typing import Optional

import torch
from linear_operator.utils.cholesky import psd_safe_cholesky
from linear_operator.utils.errors import NanError, NotPSDError

__all__ = ["NonFiniteMatrixError", "NotPositiveDefiniteError", "cholesky"]


class NotPositiveDefiniteError(NotPSDError, ValueError):
    """A matrix is not positive definite, even with jitter on its diagonal.

    Both linear_operator's :class:`~linear_operator.utils.errors.NotPSDError` (what GPyTorch and
    BoTorch catch) and a :class:`ValueError`.
    """


class NonFiniteMatrixError(NanError, ValueError):
    """A matrix to factor contains NaN or infinite entries.

    Both linear_operator's :class:`~linear_operator.utils.errors.NanError` and a
    :class:`ValueError`.
    """


def cholesky(
    matrix: torch.Tensor,
    *,
    what: str,
    hint: str = "",
    jitter: Optional[float] = None,
    max_tries: Optional[int] = None,
) -> torch.Tensor:
    """The lower Cholesky factor :math:`L` of a batch of symmetric positive definite matrices,
    :math:`A = L L^\\top`, adding jitter to the diagonal where the plain factorization fails.

    :param matrix: shape ``(..., D, D)``.
    :param what: names the matrix in an error message, e.g. ``"the covariance of site 'x'"``
        or ``"the GP's covariance of the targets"``.
    :param hint: a likely cause, appended to the message of :class:`NotPositiveDefiniteError`.
    :param jitter: the first jitter; default linear_operator's ``settings.cholesky_jitter``
        (``1e-6`` in float32, ``1e-8`` in float64).
    :param max_tries: jitter tries; default ``settings.cholesky_max_tries`` (3).
    :raises NotPositiveDefiniteError: if the matrix is not positive definite even with jitter.
    :raises NonFiniteMatrixError: if the matrix contains NaN or infinite entries.
    """
    try:
        return psd_safe_cholesky(matrix, jitter=jitter, max_tries=max_tries)
    except NanError as error:
        raise NonFiniteMatrixError(
            f"{what} contains NaN entries (are the parameters finite?): {error}"
        ) from error
    except NotPSDError as error:
        # linear_operator checks for NaN only; an infinite entry fails every jitter try.
        # Checked here, on the failure path, so a successful factorization costs no sync.
        if not torch.isfinite(matrix).all():
            raise NonFiniteMatrixError(
                f"{what} contains infinite entries (are the parameters finite?)"
            ) from error
        message = f"{what} is not positive definite, even with jitter on its diagonal: {error}"
        if hint:
            message += f" {hint}"
        raise NotPositiveDefiniteError(message) from error

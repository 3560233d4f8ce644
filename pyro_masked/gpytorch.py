"""``MaskedMarginalLogLikelihood``: a drop-in for GPyTorch's exact marginal log likelihood.

For an exact GP with a Gaussian likelihood the targets are one Gaussian vector,
:math:`y \\sim \\mathcal{N}(\\mu, K + \\Sigma_\\text{noise})`. Masked pre-training hides data
points and scores their predictions from the rest; with ``mask="cumulative"`` the sum over
every mask size is an unbiased estimate of :math:`\\log p(y)` (Fong & Holmes, 2020;
Moreno-Muñoz et al., 2023).

The module is named after the library it plugs into; inside it ``import gpytorch`` is the
GPyTorch package (absolute imports).
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from types import FrameType
from typing import Any, Optional

import gpytorch
import numpy as np
import torch
from gpytorch.likelihoods import _GaussianLikelihoodBase
from gpytorch.likelihoods.multitask_gaussian_likelihood import _MultitaskGaussianLikelihoodBase
from gpytorch.mlls import ExactMarginalLogLikelihood

from pyro_masked.local.models import LocalObjectiveCache, local_masked_score
from pyro_masked.local.neighbors import check_count
from pyro_masked.masks import MaskLike, as_schedule
from pyro_masked.scoring import NumMasks, all_finite, check_num_masks, masked_log_prob
from pyro_masked.util import private_generator

__all__ = [
    "MaskedMarginalLogLikelihood",
    "RandomMasksUnderDeterministicOptimizerWarning",
    "deterministic_num_masks",
]

#: The rule's constant and clamps; see :func:`deterministic_num_masks`.
_PERMUTATIONS_AT_ONE_POINT = 128
_MIN_DETERMINISTIC_PERMUTATIONS = 4
_MAX_DETERMINISTIC_PERMUTATIONS = 32


def deterministic_num_masks(num_points: int) -> int:
    """The number of permutations the deterministic mode (``seed`` set) averages by default.

    .. math::

        K(N) = \\min\\big(32,\\ \\max(4,\\ \\lceil 128 / \\sqrt{N} \\rceil)\\big),

    e.g. 29 at :math:`N = 20`, 17 at 60, 12 at 120, 9 at 240 and 4 from 1024 on.

    *Why.* With the masks fixed, the objective is one draw of a random function of the
    hyperparameters, and a deterministic optimiser (L-BFGS, BoTorch's ``fit_gpytorch_mll``)
    finds the optimum of that draw, not of its expectation. The shortfall in the exact log
    likelihood at the optimum shrinks like :math:`1/K` in the number of permutations and,
    per data point, roughly like :math:`1/\\sqrt{N}` in the number of data points. Measured
    with BoTorch's ``SingleTaskGP`` on noisy Hartmann-6 data (``benchmarks/gp_deterministic.py``,
    three data sets and two mask seeds per size): one permutation falls short by 0.03 to 0.14
    nats per point on average (up to 0.22) for :math:`N` from 20 to 240; the rule's default
    by at most 0.009. Each permutation costs one :math:`O(N^3)` Cholesky factorization, so
    the rule spends up to 32 (at least 4) times the factorization of the exact marginal
    likelihood (fits took 1 to 10 times as long as the exact fit in that benchmark).

    :param num_points: :math:`N`, the number of data points (coordinates masked over).
    """
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be a positive int, got {num_points!r}")
    by_size = math.ceil(_PERMUTATIONS_AT_ONE_POINT / math.sqrt(num_points))
    return min(_MAX_DETERMINISTIC_PERMUTATIONS, max(_MIN_DETERMINISTIC_PERMUTATIONS, by_size))


# The code of torch.optim.LBFGS.step (under its decorators): a closure it calls runs below a
# frame of this code.
_TORCH_LBFGS_STEP = inspect.unwrap(torch.optim.LBFGS.step).__code__
_CALLER_FRAMES_SEARCHED = 64


def _inside_torch_lbfgs() -> bool:
    """Whether this call runs inside :meth:`torch.optim.LBFGS.step` (a closure it evaluates)."""
    frame: Optional[FrameType] = sys._getframe(1)
    for _ in range(_CALLER_FRAMES_SEARCHED):
        if frame is None:
            return False
        if frame.f_code is _TORCH_LBFGS_STEP:
            return True
        frame = frame.f_back
    return False


class RandomMasksUnderDeterministicOptimizerWarning(UserWarning):
    """A deterministic optimiser (L-BFGS, BoTorch's ``fit_gpytorch_mll``) is given the
    random-mask objective (``seed=None``), which changes at every call: its line searches and
    convergence tests assume a fixed function. Set ``seed`` for the deterministic mode."""


class MaskedMarginalLogLikelihood(ExactMarginalLogLikelihood):
    """The masked pre-training estimate of the exact marginal log likelihood, per data point.

    A drop-in for :class:`gpytorch.mlls.ExactMarginalLogLikelihood` (and a subclass of it, as
    GPyTorch's :class:`~gpytorch.mlls.LeaveOneOutPseudoLikelihood` is, so code that dispatches
    on it, e.g. BoTorch's loss closures, treats it alike) with the same call and the same
    normalisation:

    .. math::

        \\frac{1}{N}\\Big(\\sum_{m=1}^{N} w_m\\, S(y; m)
            + \\textstyle\\sum_\\text{priors} \\log p(\\theta)
            + \\text{added loss terms}\\Big),

    where :math:`S(y; m)` is the mean log predictive density of :math:`m` hidden data points
    given the other :math:`N - m` under the likelihood's marginal
    :math:`\\mathcal{N}(\\mu, K + \\Sigma_\\text{noise})`, and :math:`w_m` the mask schedule's
    weights (all one for ``"cumulative"``, an unbiased estimate of the exact marginal log
    likelihood; ``mask=1`` is leave-one-out, :class:`~gpytorch.mlls.LeaveOneOutPseudoLikelihood`
    with ``num_masks="all"``). Like GPyTorch's marginal log likelihoods it is **divided by the
    number of data points** :math:`N`; Pyro's losses (:class:`~pyro_masked.MaskedELBO`) are sums.
    The prior and added-loss terms are GPyTorch's own (inherited).

    Each call costs one :math:`O(N^3)` Cholesky factorization per permutation plus
    :math:`O(N^2)` for every mask size (:mod:`pyro_masked.conditionals.gaussian`). The
    covariance is formed densely (GPyTorch's iterative solvers are not used).

    *Two modes, chosen by* ``seed``.

    - ``seed=None`` (random masks): every call draws new permutations from torch's global
      generator (``pyro.set_rng_seed`` makes them reproducible), by default one
      (``num_masks=None`` means 1): an unbiased, noisy objective for a stochastic optimiser
      such as Adam. A deterministic optimiser must not be given it: called from
      :class:`torch.optim.LBFGS` or BoTorch's ``fit_gpytorch_mll``, it warns (once) with
      :class:`RandomMasksUnderDeterministicOptimizerWarning`; other deterministic optimisers
      (e.g. SciPy's, called directly) are not detected.
    - ``seed`` an int (deterministic mode): every call scores the same permutations, drawn from
      a private :class:`torch.Generator` seeded by ``seed`` (the global generators are neither
      read nor reseeded), so the objective is a fixed, smooth function of the hyperparameters
      for L-BFGS or BoTorch's ``fit_gpytorch_mll``. A fixed draw is a biased objective for an
      optimiser that can exploit it, so by default (``num_masks=None``) it averages
      :func:`deterministic_num_masks` ``(N)`` permutations, which keeps the fitted exact log
      likelihood within about 0.02 nats per point of the exact fit's.

    Example::

        >>> class ExactGPModel(gpytorch.models.ExactGP):
        ...     def __init__(self, train_x, train_y, likelihood):
        ...         super().__init__(train_x, train_y, likelihood)
        ...         self.mean_module = gpytorch.means.ConstantMean()
        ...         self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        ...     def forward(self, x):
        ...         mean, covariance = self.mean_module(x), self.covar_module(x)
        ...         return gpytorch.distributions.MultivariateNormal(mean, covariance)
        >>> train_x = torch.linspace(0.0, 1.0, 50)
        >>> train_y = torch.sin(6.0 * train_x) + 0.1 * torch.randn(50)
        >>> likelihood = gpytorch.likelihoods.GaussianLikelihood()
        >>> model = ExactGPModel(train_x, train_y, likelihood)
        >>> mll = MaskedMarginalLogLikelihood(likelihood, model, mask="cumulative", num_masks=64)
        >>> exact = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        >>> output = model(train_x)
        >>> masked, reference = mll(output, train_y), exact(output, train_y)
        >>> masked.shape, abs(masked.item() - reference.item()) < 0.05
        (torch.Size([]), True)
        >>> (-masked).backward()  # gradients for the hyperparameters, as with the exact objective
        >>> model.covar_module.raw_outputscale.grad is not None
        True

    With BoTorch (the deterministic mode)::

        >>> from botorch.fit import fit_gpytorch_mll
        >>> mll = fit_gpytorch_mll(MaskedMarginalLogLikelihood(model.likelihood, model, seed=0))
        >>> mll.training  # fitted, and left in evaluation mode as BoTorch does
        False

    A covariance that is not positive definite, even with jitter, raises
    :class:`~pyro_masked.linalg.NotPositiveDefiniteError`, a
    :class:`~linear_operator.utils.errors.NotPSDError` as GPyTorch raises, so BoTorch's
    ``fit_gpytorch_mll`` restarts from new hyperparameters as it does for the exact one.

    :param likelihood: a :class:`~gpytorch.likelihoods.GaussianLikelihood` or
        :class:`~gpytorch.likelihoods.FixedNoiseGaussianLikelihood` (single-output).
    :param model: the :class:`~gpytorch.models.ExactGP`.
    :param mask: ``"cumulative"`` (unbiased), an int mask size, a float rate in ``(0, 1)`` or
        a :class:`~pyro_masked.masks.MaskSchedule`.
    :param num_masks: permutations averaged per call (an int >= 1), ``"all"`` (the exact
        expectation over masks; small ``N`` only), or ``None``: 1 with random masks,
        :func:`deterministic_num_masks` ``(N)`` in the deterministic mode.
    :param seed: an int for the deterministic mode, or ``None`` for random masks.
    :param context_size: ``None`` (exact contexts, as above) or :math:`c`: score a minibatch
        of ``batch_size`` hidden points per call, each from the :math:`c` nearest members of
        its random context (:mod:`pyro_masked.local`). Each call then costs
        :math:`O(B c^3)` whatever :math:`N`, after a one-off neighbour search of the training
        inputs (cached; redone if they change); kernel blocks are evaluated from the model's
        kernel for the sampled points only, so nothing of size :math:`N \times N` is formed
        and an ``ExactGP`` loop runs unchanged at :math:`N = 10^6`. The value is an unbiased
        estimate of the local masked score divided by :math:`N` (of the exact one when
        :math:`c = N - 1`). Needs a model without batch dimensions whose ``forward`` returns
        ``MultivariateNormal(mean, covar_module(x))``. In the deterministic mode every call
        scores the same minibatch.
    :param batch_size: hidden points per call with ``context_size``.
    :param allow_duplicates: with ``context_size``, accept repeated training inputs (safe with
        a noise term; by default they raise ``ValueError``).

    References:

    - P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the
      Marginal Likelihood", NeurIPS 2023.
    - E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
    """

    def __init__(
        self,
        likelihood: gpytorch.likelihoods.Likelihood,
        model: gpytorch.models.GP,
        mask: MaskLike = "cumulative",
        num_masks: Optional[NumMasks] = None,
        seed: Optional[int] = None,
        context_size: Optional[int] = None,
        batch_size: int = 1024,
        allow_duplicates: bool = False,
    ):
        if isinstance(likelihood, _MultitaskGaussianLikelihoodBase):
            raise TypeError(
                "MaskedMarginalLogLikelihood supports single-output Gaussian likelihoods; "
                f"got the multitask likelihood {type(likelihood).__name__}"
            )
        if not isinstance(likelihood, _GaussianLikelihoodBase):
            raise TypeError(
                "MaskedMarginalLogLikelihood needs a Gaussian likelihood (GaussianLikelihood or "
                f"FixedNoiseGaussianLikelihood) for exact GP inference; got "
                f"{type(likelihood).__name__}"
            )
        if not isinstance(model, gpytorch.models.GP):
            raise TypeError(f"model must be a gpytorch.models.GP, got {type(model).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        schedule = as_schedule(mask)
        num_masks = None if num_masks is None else check_num_masks(num_masks)
        local_cache = None
        if context_size is not None:
            if num_masks is not None:
                raise ValueError("num_masks does not apply with context_size; set batch_size")
            local_cache = LocalObjectiveCache(
                context_size, mask=schedule, allow_duplicates=allow_duplicates
            )
            batch_size = check_count(batch_size, "batch_size")
        super().__init__(likelihood, model)
        self.schedule = schedule
        self.num_masks = num_masks
        self.seed = seed
        self.context_size = context_size
        self.batch_size = batch_size
        self._local_cache = local_cache

    def forward(
        self,
        function_dist: gpytorch.distributions.MultivariateNormal,
        target: torch.Tensor,
        *params: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The masked marginal log likelihood of ``target`` per data point.

        :param function_dist: :math:`p(f)` at the training inputs, the output of
            ``model(train_x)`` (a GPyTorch :class:`~gpytorch.distributions.MultivariateNormal`).
        :param target: the training targets, shape ``batch_shape + (N,)``; NaN entries are
            rejected (GPyTorch's ``observation_nan_policy`` is not supported).
        :param params: passed on to the likelihood, as GPyTorch does.
        :returns: shape ``batch_shape`` of the model.
        :raises ~pyro_masked.linalg.NotPositiveDefiniteError: if the marginal covariance is
            not positive definite even with jitter.
        """
        if isinstance(function_dist, gpytorch.distributions.MultitaskMultivariateNormal):
            raise TypeError(
                "MaskedMarginalLogLikelihood supports single-output GPs; the model returned a "
                "MultitaskMultivariateNormal"
            )
        if not isinstance(function_dist, gpytorch.distributions.MultivariateNormal):
            raise TypeError(
                "function_dist must be the GPyTorch MultivariateNormal returned by the model, "
                f"got {type(function_dist).__name__}"
            )
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a tensor, got {type(target).__name__}")
        num_data = function_dist.event_shape.numel()
        if target.dim() == 0 or target.shape[-1] != num_data:
            raise ValueError(
                f"target has shape {tuple(target.shape)} but the GP has {num_data} data points "
                "(the target's last dimension)"
            )
        if not all_finite(target):
            raise ValueError("target contains NaN or infinite entries")
        if self.seed is None and _inside_torch_lbfgs():
            self._warn_random_masks("torch.optim.LBFGS")
        if self._local_cache is not None:
            rng = None if self.seed is None else np.random.default_rng(self.seed)
            score = local_masked_score(
                self._local_cache,
                function_dist,
                target,
                self.likelihood,
                self.batch_size,
                *params,
                rng=rng,
                **kwargs,
            )
        else:
            marginal = self.likelihood(function_dist, *params, **kwargs)
            score = self._masked_score(marginal, target, num_data)
        score = self._add_other_terms(score, params)
        return score / num_data

    def resolved_num_masks(self, num_data: int) -> NumMasks:
        """The permutations a call with ``num_data`` data points averages (``num_masks``
        resolved: 1 with random masks, :func:`deterministic_num_masks` with a seed)."""
        if self.num_masks is not None:
            return self.num_masks
        return 1 if self.seed is None else deterministic_num_masks(num_data)

    def _masked_score(self, marginal, target: torch.Tensor, num_data: int) -> torch.Tensor:
        num_masks = self.resolved_num_masks(num_data)
        # The deterministic mode re-seeds a private generator at every call, so every call
        # draws the same permutations and the caller's generators are never read or reseeded.
        generator = None if self.seed is None else private_generator(self.seed, target.device)
        return masked_log_prob(marginal, target, self.schedule, num_masks, generator=generator)

    def _warn_random_masks(self, optimizer: str) -> None:
        """Warn once per instance that a deterministic optimizer gets random masks."""
        if self.seed is not None or getattr(self, "_warned_random_masks", False):
            return
        self._warned_random_masks = True
        warnings.warn(
            f"MaskedMarginalLogLikelihood(seed=None) draws new masks at every call, but it is "
            f"optimised by {optimizer}, which assumes a fixed objective: pass seed=0 (or any "
            "int) for the deterministic mode",
            RandomMasksUnderDeterministicOptimizerWarning,
            stacklevel=3,
        )

    def compute_custom_loss(self, **kwargs: Any) -> torch.Tensor:
        """The negative objective on the model's own training data, as BoTorch evaluates it.

        BoTorch's ``fit_gpytorch_mll`` calls this method when a marginal log likelihood has
        it, in place of its closure for :class:`~gpytorch.mlls.ExactMarginalLogLikelihood`;
        it evaluates the same thing (the model at its training inputs, the likelihood given
        the transformed inputs) and warns once with
        :class:`RandomMasksUnderDeterministicOptimizerWarning` if ``seed`` is ``None``.
        """
        self._warn_random_masks("BoTorch's fit_gpytorch_mll (L-BFGS)")
        model = self.model
        transform = getattr(model, "transform_inputs", None)
        inputs = model.train_inputs
        transformed = inputs if transform is None else [transform(X=x) for x in inputs]
        return -self(model(*inputs), model.train_targets, *transformed, **kwargs)

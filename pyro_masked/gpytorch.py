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

from typing import Optional

import gpytorch
import torch
from gpytorch.likelihoods import _GaussianLikelihoodBase
from gpytorch.likelihoods.multitask_gaussian_likelihood import _MultitaskGaussianLikelihoodBase
from gpytorch.mlls import MarginalLogLikelihood

from pyro_masked.masks import MaskLike, as_schedule
from pyro_masked.scoring import NumMasks, all_finite, check_num_masks, masked_log_prob

__all__ = ["MaskedMarginalLogLikelihood"]


class MaskedMarginalLogLikelihood(MarginalLogLikelihood):
    """The masked pre-training estimate of the exact marginal log likelihood, per data point.

    A drop-in for :class:`gpytorch.mlls.ExactMarginalLogLikelihood` in an ``ExactGP``
    training loop, with the same call and the same normalisation:

    .. math::

        \\frac{1}{N}\\Big(\\sum_{m=1}^{N} w_m\\, S(y; m)
            + \\textstyle\\sum_\\text{priors} \\log p(\\theta)
            + \\text{added loss terms}\\Big),

    where :math:`S(y; m)` is the mean log predictive density of :math:`m` hidden data points
    given the other :math:`N - m` under the likelihood's marginal
    :math:`\\mathcal{N}(\\mu, K + \\Sigma_\\text{noise})`, and :math:`w_m` the mask schedule's
    weights (all one for ``"cumulative"``, an unbiased estimate of the exact marginal log
    likelihood). Like GPyTorch's marginal log likelihoods it is **divided by the number of
    data points** :math:`N`; Pyro's losses (:class:`~pyro_masked.MaskedELBO`) are sums.

    Each call costs one :math:`O(N^3)` Cholesky factorization per permutation plus
    :math:`O(N^2)` for every mask size (:mod:`pyro_masked.conditionals.gaussian`), about the
    cost of the exact marginal log likelihood with ``num_masks=1``. The covariance is formed
    densely (GPyTorch's iterative solvers are not used).

    *Deterministic mode.* With ``seed`` set, every call draws the same masks (from a private
    generator state seeded by ``seed``; the global RNG is left untouched), so the objective is
    a fixed, smooth function of the hyperparameters that L-BFGS or BoTorch's
    ``fit_gpytorch_mll`` can optimise. With ``seed=None`` every call draws new masks from
    torch's global generator (``pyro.set_rng_seed`` makes them reproducible): use a stochastic
    optimizer such as Adam.

    Example::

        >>> likelihood = gpytorch.likelihoods.GaussianLikelihood()
        >>> model = ExactGPModel(train_x, train_y, likelihood)
        >>> mll = MaskedMarginalLogLikelihood(likelihood, model, mask="cumulative")
        >>> output = model(train_x)
        >>> loss = -mll(output, train_y)
        >>> loss.backward()

    :param likelihood: a :class:`~gpytorch.likelihoods.GaussianLikelihood` or
        :class:`~gpytorch.likelihoods.FixedNoiseGaussianLikelihood` (single-output).
    :param model: the :class:`~gpytorch.models.ExactGP`.
    :param mask: ``"cumulative"`` (unbiased), an int mask size, a float rate in ``(0, 1)`` or
        a :class:`~pyro_masked.masks.MaskSchedule`.
    :param num_masks: random permutations averaged per call, or ``"all"`` (the exact
        expectation over masks; small ``N`` only).
    :param seed: an int for the deterministic mode, or ``None``.

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
        num_masks: NumMasks = 1,
        seed: Optional[int] = None,
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
        super().__init__(likelihood, model)
        self.schedule = as_schedule(mask)
        self.num_masks = check_num_masks(num_masks)
        self.seed = seed

    def forward(self, function_dist, target: torch.Tensor, *params, **kwargs) -> torch.Tensor:
        """The masked marginal log likelihood of ``target`` per data point.

        :param function_dist: :math:`p(f)` at the training inputs, the output of
            ``model(train_x)`` (a GPyTorch :class:`~gpytorch.distributions.MultivariateNormal`).
        :param target: the training targets, shape ``batch_shape + (N,)``; NaN entries are
            rejected (GPyTorch's ``observation_nan_policy`` is not supported).
        :returns: shape ``batch_shape`` of the model.
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
        marginal = self.likelihood(function_dist, *params, **kwargs)
        score = self._masked_score(marginal, target)
        score = self._add_prior_and_loss_terms(score, params)
        return score / num_data

    def _masked_score(self, marginal, target: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            return masked_log_prob(marginal, target, self.schedule, self.num_masks)
        # Fork the generator of the device the permutations are drawn on, so the caller's
        # random stream is unchanged and every call sees the same masks.
        device = target.device
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            return masked_log_prob(marginal, target, self.schedule, self.num_masks)

    def _add_prior_and_loss_terms(self, score: torch.Tensor, params) -> torch.Tensor:
        """Add the model's added loss terms and the log densities of its registered priors.

        A prior over a batched hyperparameter contributes per batch element: its log density
        is summed over the dimensions beyond the score's batch dimensions.
        """
        for loss_term in self.model.added_loss_terms():
            score = score + loss_term.loss(*params)
        for _, module, prior, closure, _ in self.model.named_priors():
            log_prior = prior.log_prob(closure(module))
            leading = log_prior.shape[: score.dim()]
            score = score + log_prior.reshape(*leading, -1).sum(-1)
        return score

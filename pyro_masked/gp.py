"""Gaussian process regression for Pyro on GPyTorch kernels, fitted by masking or exactly.

The model is :math:`f \\sim \\mathcal{GP}(m, k)`, :math:`y_n = f(x_n) + \\epsilon_n`,
:math:`\\epsilon_n \\sim \\mathcal{N}(0, \\sigma^2)`, so the targets have the evidence

.. math::

    \\log p(y \\mid X) = \\log \\mathcal{N}\\big(y;\\, m(X),\\, K_{XX} + \\sigma^2 I\\big),

one Gaussian vector whose :math:`N` coordinates are the data points. Masked pre-training hides
data points and scores their predictions from the rest, i.e. leave-:math:`p`-out
cross-validation; summed over every mask size (``mask="cumulative"``) it is an unbiased
estimate of the evidence (Fong & Holmes, 2020; Moreno-Muñoz et al., 2023), computed from one
Cholesky factor per random permutation (:mod:`pyro_masked.conditionals.gaussian`).

:class:`GPRegression` follows :class:`pyro.contrib.gp.models.GPRegression`: ``model()``,
``guide()`` and ``forward(Xnew, full_cov=False, noiseless=True)`` for prediction, with any
GPyTorch kernel and mean. :func:`fit` trains it with :class:`~pyro_masked.MaskedELBO` or the
exact evidence.

*How optimizers see the hyperparameters.* The kernel and the mean are registered as ordinary
torch submodules of the :class:`~pyro.nn.PyroModule`, so ``gp.parameters()`` holds their raw
(unconstrained) GPyTorch parameters, the unconstrained noise and, once the guide has run, the
guide's parameters; GPyTorch's constraints apply as usual. :func:`fit` optimises exactly these
with a torch optimizer inside a fresh scope of Pyro's param store
(:meth:`~pyro.params.param_store.ParamStoreDict.scope`), so several models never share
entries of the global param store and the store is left as it was. For a hand-written
:class:`~pyro.infer.SVI` loop with the global param store, Pyro's rule for plain torch
submodules of a :class:`~pyro.nn.PyroModule` applies: reading ``self.kernel`` inside
``model()`` registers it with :func:`pyro.module` under the module's name (``"kernel"`` and
``"mean_function"`` for a top-level module), so Pyro's optimizers see its parameters; give
each model a distinct ``name`` or clear the param store between models.

*Normalisation.* Pyro losses are sums over data points: :func:`fit` records the negative ELBO
(the negative log evidence, or its masked estimate) of the whole data set, not a per-point mean
as GPyTorch's marginal log likelihoods report.

References:

- C. E. Rasmussen, C. K. I. Williams, "Gaussian Processes for Machine Learning", MIT Press
  2006, chapters 2 and 5.
- P. Moreno-Muñoz, P. Garcia Recasens, S. Hauberg, "On Masked Pre-training and the Marginal
  Likelihood", NeurIPS 2023.
- E. Fong, C. C. Holmes, "On the marginal likelihood and cross-validation", Biometrika 2020.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Mapping, Optional, Union

import gpytorch
import pyro
import pyro.distributions as dist
import torch
from linear_operator.operators import DenseLinearOperator
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_median
from pyro.nn import PyroModule, PyroParam, PyroSample, pyro_method
from tqdm import tqdm

from pyro_masked.gpytorch import (
    RandomMasksUnderDeterministicOptimizerWarning,
    deterministic_num_masks,
)
from pyro_masked.infer import MaskedELBO
from pyro_masked.linalg import cholesky
from pyro_masked.local.estimator import LocalMaskedObjective
from pyro_masked.local.models import local_observe
from pyro_masked.local.neighbors import check_count
from pyro_masked.local.predict import local_predict
from pyro_masked.masks import MaskLike
from pyro_masked.scoring import NumMasks
from pyro_masked.util import LOG_2PI, private_generator

__all__ = ["GPRegression", "fit"]


class _GPTargetDistribution(gpytorch.distributions.MultivariateNormal):
    """The targets' Gaussian, whose ``log_prob`` is always the exact one by Cholesky.

    GPyTorch's own ``log_prob`` switches to iterative (approximate) solves above
    ``gpytorch.settings.max_cholesky_size``; the exact objective of :func:`fit` must stay exact.
    The covariance is kept lazy so that building the distribution factors nothing (the masked
    score factors permuted copies of it instead).
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        covariance = self.lazy_covariance_matrix.to_dense()
        factor = _target_cholesky(covariance)
        residual = (value - self.loc).unsqueeze(-1)
        whitened = torch.linalg.solve_triangular(factor, residual, upper=False).squeeze(-1)
        half_log_det = torch.diagonal(factor, dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * whitened.square().sum(-1) - half_log_det - 0.5 * value.shape[-1] * LOG_2PI


_TARGET_COVARIANCE = "the GP's covariance of the targets y"


def _check_noise(noise, X: torch.Tensor) -> torch.Tensor:
    """The initial noise variance as a tensor of ``X``'s dtype and device (a copy)."""
    if noise is None:
        return torch.tensor(1.0, dtype=X.dtype, device=X.device)
    if isinstance(noise, torch.Tensor):
        if noise.numel() != 1:
            raise ValueError(f"noise must be a scalar, got a tensor of shape {tuple(noise.shape)}")
        value = noise.detach().reshape(()).to(dtype=X.dtype, device=X.device).clone()
    elif isinstance(noise, (int, float)) and not isinstance(noise, bool):
        value = torch.tensor(float(noise), dtype=X.dtype, device=X.device)
    else:
        raise TypeError(f"noise must be a positive number or scalar tensor, got {noise!r}")
    if not (torch.isfinite(value) and value > 0):
        raise ValueError(f"noise must be a positive number, got {noise!r}")
    return value


def _init_to_current_values(site: dict, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """An autoguide ``init_loc_fn``: a hyperparameter's site starts at its value when the model
    was built, or at its prior's median if that value is outside the prior's support.

    Sites are matched by the key of ``priors`` at the end of their name, since the module's name
    prefix is known only once it runs.
    """
    for key, value in values.items():
        if site["name"] == key or site["name"].endswith("." + key):
            if bool(site["fn"].support.check(value).all()):
                return value
            return init_to_median(site)
    raise KeyError(f"no initial value for the site {site['name']!r}")


_SINGULAR_HINT = (
    "The inputs X make the kernel matrix singular and the noise is too small to regularise it "
    "(duplicate inputs without noise?)."
)


def _target_cholesky(covariance: torch.Tensor) -> torch.Tensor:
    return cholesky(covariance, what=_TARGET_COVARIANCE, hint=_SINGULAR_HINT)


class _DenseKernel(torch.nn.Module):
    """Evaluates a kernel to a dense matrix inside ``torch.func.functional_call``.

    GPyTorch kernels evaluate lazily; the matrix must be formed while the substituted
    hyperparameters are in place.
    """

    def __init__(self, kernel: gpytorch.kernels.Kernel):
        super().__init__()
        self.kernel = kernel

    def forward(self, x1: torch.Tensor, x2: Optional[torch.Tensor], diag: bool) -> torch.Tensor:
        if diag:
            return self.kernel(x1, diag=True)
        return self.kernel(x1, x2).to_dense()


def _check_inputs(X: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(X).__name__}")
    if X.dim() not in (1, 2):
        raise ValueError(f"{name} must have shape (N,) or (N, d), got {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or infinite entries")
    return X.unsqueeze(-1) if X.dim() == 1 else X


def _check_targets(y: torch.Tensor, num_inputs: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a tensor, got {type(y).__name__}")
    if y.dim() != 1:
        raise ValueError(f"y must have shape (N,) (one target per input), got {tuple(y.shape)}")
    if y.shape[0] != num_inputs:
        raise ValueError(f"X has {num_inputs} inputs but y has {y.shape[0]} targets")
    if not torch.isfinite(y).all():
        raise ValueError("y contains NaN or infinite entries")
    return y


class GPRegression(PyroModule):
    """Gaussian process regression with a GPyTorch kernel and mean, for Pyro.

    The observed site ``"y"`` has the distribution
    :math:`\\mathcal{N}(m(X), K_{XX} + (\\sigma^2 + \\text{jitter}) I)`, so
    :class:`~pyro.infer.Trace_ELBO` uses the exact evidence and
    :class:`~pyro_masked.MaskedELBO` its masked estimate (leave-:math:`p`-out
    cross-validation over data points, every :math:`p` for ``mask="cumulative"``).

    The signature is :class:`pyro.contrib.gp.models.GPRegression`'s
    (``X, y, kernel, noise=None, mean_function=None, jitter=1e-6``), with these differences:

    - ``kernel`` is a GPyTorch kernel, not a ``pyro.contrib.gp`` one (the package is for
      GPyTorch's kernels; a ``pyro.contrib.gp`` model can be masked as it is, with
      :class:`~pyro_masked.MaskedELBO`);
    - ``y`` is required and has shape ``(N,)``: the masked objective needs observations, and
      several outputs would share one permutation of the data points (fit them separately);
    - priors are given as ``priors=`` (below), not by assigning ``PyroSample`` attributes, so
      that they apply to GPyTorch's constrained hyperparameters.

    Example::

        >>> import gpytorch
        >>> X = torch.linspace(0.0, 1.0, 30)
        >>> y = torch.sin(6.0 * X) + 0.1 * torch.randn(30)
        >>> kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())
        >>> gp = GPRegression(X, y, kernel, noise=torch.tensor(0.1))
        >>> losses = fit(gp, objective="masked", num_steps=100, lr=0.05, progress=False)
        >>> losses[-1] < losses[0]
        True
        >>> mean, var = gp(torch.tensor([0.25, 0.5]), noiseless=False)
        >>> mean.shape, bool((var > 0).all())
        (torch.Size([2]), True)

    :param X: inputs, shape ``(N,)`` or ``(N, d)``; a 1-D tensor is one input dimension.
    :param y: targets, shape ``(N,)``.
    :param kernel: any :class:`gpytorch.kernels.Kernel` (scaled, sums, products, ARD).
    :param noise: initial variance :math:`\\sigma^2` of the Gaussian noise, a positive number
        or scalar tensor (learned); ``None`` is 1, as in Pyro.
    :param mean_function: a :class:`gpytorch.means.Mean`, any other :class:`torch.nn.Module`
        or callable mapping ``X`` of shape ``(N, d)`` to shape ``(N,)``, or ``None`` (the zero
        mean). Priors on its hyperparameters need a module.
    :param jitter: added to the diagonal for numerical stability, not learned.
    :param priors: optional priors on hyperparameters, keyed by ``"noise"`` or the dotted name of
        a GPyTorch hyperparameter under ``"kernel."`` or ``"mean_function."`` (the constrained
        name, e.g. ``"kernel.base_kernel.lengthscale"``, ``"kernel.outputscale"``,
        ``"mean_function.constant"``). A scalar prior is expanded to the hyperparameter's shape.
        Hyperparameters with priors become latent sample sites of the same names, handled by
        the guide, which starts at their current values (``noise`` and the kernel's and mean's
        values when the model is built; the prior's median where such a value is outside the
        prior's support).
    :param guide: ``"delta"`` (:class:`~pyro.infer.autoguide.AutoDelta`: MAP) or ``"normal"``
        (:class:`~pyro.infer.autoguide.AutoNormal`: a posterior over the hyperparameters with
        priors). Unused without priors. Its parameters exist from construction on, so
        ``state_dict()`` of a trained model loads (strictly) into a freshly built one.
    :param name: the module's name, the prefix of its sites and parameters.
    :param context_size: ``None`` (the exact model above) or :math:`c`, for data sets too
        large for the exact evidence: ``model()`` then observes a minibatch of
        ``batch_size`` hidden points, each given the :math:`c` nearest members of a random
        context, inside ``pyro.plate(name + "y_points", N, subsample_size=batch_size)``
        (:func:`pyro_masked.local.models.local_observe`). The plate's scale makes the
        model's log joint an unbiased estimate of the local masked score (the evidence of
        the local approximation for ``mask="cumulative"``), at :math:`O(B c^3)` per step
        whatever :math:`N`, after a one-off neighbour search. The masking happens inside the
        model, so train it with :class:`~pyro.infer.Trace_ELBO` (``fit(gp,
        objective="exact")``); :class:`~pyro_masked.MaskedELBO` gives the same loss and warns
        that the univariate site leaves it nothing to mask. ``forward`` predicts by local
        kriging from the :math:`c` nearest training points (``full_cov`` unavailable).
    :param batch_size: hidden points per step with ``context_size``.
    :param mask: the mask schedule of the local objective (with ``context_size`` only; the
        schedule is drawn inside the model, so ``fit``'s ``mask`` does not reach it).
    """

    def __init__(
        self,
        X: torch.Tensor,
        y: torch.Tensor,
        kernel: gpytorch.kernels.Kernel,
        noise: Union[float, torch.Tensor, None] = None,
        mean_function: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        jitter: float = 1e-6,
        *,
        priors: Optional[Mapping[str, dist.TorchDistribution]] = None,
        guide: str = "delta",
        name: str = "",
        context_size: Optional[int] = None,
        batch_size: int = 1024,
        mask: MaskLike = "cumulative",
    ):
        super().__init__(name)
        if not isinstance(kernel, gpytorch.kernels.Kernel):
            raise TypeError(
                f"kernel must be a gpytorch.kernels.Kernel, got {type(kernel).__name__}"
            )
        if mean_function is None:
            mean_function = gpytorch.means.ZeroMean()
        if not callable(mean_function):
            raise TypeError(
                f"mean_function must be a gpytorch.means.Mean or a callable, got "
                f"{type(mean_function).__name__}"
            )
        if not isinstance(jitter, (int, float)) or isinstance(jitter, bool) or not jitter >= 0:
            raise ValueError(f"jitter must be a non-negative number, got {jitter!r}")
        if guide not in ("delta", "normal"):
            raise ValueError(f"guide must be 'delta' or 'normal', got {guide!r}")
        X = _check_inputs(X, "X")
        initial_noise = _check_noise(noise, X)
        self.X = X
        self.y = _check_targets(y, X.shape[0])
        self.context_size = context_size
        self.batch_size = batch_size
        self._local_objective = None
        if context_size is not None:
            self.batch_size = check_count(batch_size, "batch_size")
            self._local_objective = LocalMaskedObjective(X, context_size, mask=mask)
        self.kernel = kernel
        self.mean_function = mean_function
        self.jitter = float(jitter)
        priors = dict(priors or {})
        noise_prior = priors.pop("noise", None)
        if noise_prior is None:
            self.noise = PyroParam(initial_noise, constraint=constraints.positive)
        else:
            if not isinstance(noise_prior, dist.Distribution):
                raise TypeError("priors['noise'] must be a Pyro distribution")
            self.noise = PyroSample(noise_prior)  # type: ignore[assignment]
        self._hyperpriors = {
            key: self._locate_hyperparameter(key, prior) for key, prior in priors.items()
        }
        self._has_priors = noise_prior is not None or bool(self._hyperpriors)
        if self._has_priors:
            initial = dict(self._current_values())
            if noise_prior is not None:
                initial["noise"] = initial_noise
            guide_class = AutoDelta if guide == "delta" else AutoNormal
            init_loc_fn = functools.partial(_init_to_current_values, values=initial)
            self.autoguide = guide_class(self.model, init_loc_fn=init_loc_fn)
            self._create_guide_parameters()

    def _current_values(self):
        """``(key, constrained value)`` of each hyperparameter with a prior, as it is now."""
        for key in self._hyperpriors:
            owner_path, _, attribute = key.rpartition(".")
            yield key, getattr(self.get_submodule(owner_path), attribute).detach().clone()

    def _create_guide_parameters(self) -> None:
        """Run the autoguide once, so that its parameters exist (and are in ``state_dict``).

        An autoguide creates its parameters on its first call, which traces the model and, for
        :class:`~pyro.infer.autoguide.AutoNormal`, draws a sample. The draws come from the
        global generator of the data's device, whose state is restored afterwards; the param
        store is left as it was.
        """
        devices = [self.X.device] if self.X.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), pyro.get_param_store().scope():
            with torch.no_grad():
                self.autoguide()

    # -- hyperparameters with priors ---------------------------------------------------------

    def _locate_hyperparameter(self, key: str, prior: dist.TorchDistribution):
        """``(raw parameter path, transform to raw, prior of the right shape)`` for ``key``."""
        if not isinstance(prior, dist.Distribution):
            raise TypeError(f"priors[{key!r}] must be a Pyro distribution")
        owner_path, _, attribute = key.rpartition(".")
        if owner_path.split(".")[0] not in ("kernel", "mean_function"):
            raise ValueError(
                f"priors key {key!r} must be 'noise' or start with 'kernel.' or 'mean_function.'"
            )
        if owner_path.split(".")[0] == "mean_function" and not isinstance(
            self.mean_function, torch.nn.Module
        ):
            raise ValueError(
                f"priors key {key!r}: the mean function is a plain callable without "
                "hyperparameters; a prior needs a gpytorch.means.Mean or another torch.nn.Module"
            )
        try:
            owner = self.get_submodule(owner_path)
        except AttributeError as error:
            raise ValueError(f"priors key {key!r}: no submodule {owner_path!r}") from error
        parameters = dict(owner.named_parameters(recurse=False))
        if "raw_" + attribute in parameters:
            raw_name = "raw_" + attribute
            constraint = owner.constraint_for_parameter_name(raw_name)  # type: ignore[operator]
            to_raw = constraint.inverse_transform if constraint is not None else (lambda v: v)
        elif attribute in parameters:
            raw_name, to_raw = attribute, (lambda v: v)
        else:
            raise ValueError(
                f"priors key {key!r}: {owner_path} has no hyperparameter {attribute!r}"
            )
        shape = parameters[raw_name].shape
        if prior.batch_shape == () and prior.event_shape == () and len(shape) > 0:
            prior = prior.expand(shape).to_event(len(shape))
        elif prior.shape() != shape:
            raise ValueError(
                f"priors[{key!r}] has shape {tuple(prior.shape())}, the hyperparameter "
                f"{tuple(shape)}"
            )
        path = (owner_path + "." + raw_name).split(".", 1)  # ("kernel", "base_kernel.raw_...")
        return path, to_raw, prior

    def _sample_hyperparameters(self) -> dict[str, dict[str, torch.Tensor]]:
        """Sample each hyperparameter with a prior; return raw overrides per submodule."""
        overrides: dict[str, dict[str, torch.Tensor]] = {"kernel": {}, "mean_function": {}}
        for key, ((module, raw_path), to_raw, prior) in self._hyperpriors.items():
            value = pyro.sample(self._pyro_get_fullname(key), prior)
            overrides[module][raw_path] = to_raw(value)
        return overrides

    def _median_hyperparameters(self) -> dict[str, dict[str, torch.Tensor]]:
        """Raw overrides at the guide's median (the point estimate used for prediction)."""
        overrides: dict[str, dict[str, torch.Tensor]] = {"kernel": {}, "mean_function": {}}
        if not self._hyperpriors:
            return overrides
        median = self.autoguide.median()
        for key, ((module, raw_path), to_raw, _) in self._hyperpriors.items():
            overrides[module][raw_path] = to_raw(median[self._pyro_get_fullname(key)])
        return overrides

    def _noise_value(self, use_median: bool) -> torch.Tensor:
        if use_median and "noise" in self._pyro_samples:
            return self.autoguide.median()[self._pyro_get_fullname("noise")]
        return self.noise  # type: ignore[return-value]

    # -- kernel and mean evaluation -------------------------------------------------------------

    def _kernel(self, x1, x2, overrides, diag=False) -> torch.Tensor:
        evaluator = _DenseKernel(self.kernel)
        renamed = {"kernel." + name: value for name, value in overrides["kernel"].items()}
        return torch.func.functional_call(evaluator, renamed, (x1, x2, diag))

    def _mean(self, x, overrides) -> torch.Tensor:
        if not isinstance(self.mean_function, torch.nn.Module):
            return self.mean_function(x)
        return torch.func.functional_call(self.mean_function, overrides["mean_function"], (x,))

    def _target_covariance(self, overrides, noise) -> torch.Tensor:
        covariance = self._kernel(self.X, self.X, overrides)
        diagonal = torch.diagonal(covariance)
        return covariance + torch.diag_embed((noise + self.jitter).expand_as(diagonal))

    # -- Pyro interface -------------------------------------------------------------------------

    @pyro_method
    def model(self) -> None:
        """The generative model: hyperparameters with priors, then the observed targets ``y``."""
        overrides = self._sample_hyperparameters()
        noise = self.noise
        if self._local_objective is not None:
            local_observe(
                self._pyro_get_fullname("y"),
                self._local_objective,
                lambda points: self._kernel(points, points, overrides),
                self.X,
                self.y,
                noise + self.jitter,  # type: ignore[operator]
                self.batch_size,
                mean=self._mean(self.X, overrides),
            )
            return
        covariance = self._target_covariance(overrides, noise)
        loc = self._mean(self.X, overrides)
        pyro.sample(
            self._pyro_get_fullname("y"),
            _GPTargetDistribution(loc, DenseLinearOperator(covariance)),
            obs=self.y,
        )

    @pyro_method
    def guide(self) -> None:
        """The autoguide over hyperparameters with priors; nothing without priors."""
        if self._has_priors:
            self.autoguide()

    def forward(
        self, Xnew: torch.Tensor, full_cov: bool = False, noiseless: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior predictive mean and covariance (or variance) at ``Xnew``.

        With :math:`K = K_{XX} + \\sigma^2 I = L L^\\top`, :math:`K_* = K_{X X_*}` and
        :math:`V = L^{-1} K_*`:

        .. math::

            \\mu_* = m(X_*) + K_*^\\top K^{-1} (y - m(X)), \\qquad
            \\Sigma_* = K_{X_* X_*} - V^\\top V \\; (+\\, \\sigma^2 I \\text{ if not noiseless}).

        Hyperparameters with priors are set to the guide's median.

        :param Xnew: shape ``(M,)`` or ``(M, d)``, the same input dimension as ``X``.
        :param full_cov: return the ``(M, M)`` covariance instead of the ``(M,)`` variances.
        :param noiseless: predict :math:`f` (``True``) or a new observation :math:`y`
            (``False``, adds the noise variance).
        :returns: ``(mean, cov)`` or ``(mean, var)``.
        """
        Xnew = _check_inputs(Xnew, "Xnew")
        if Xnew.shape[-1] != self.X.shape[-1]:
            raise ValueError(
                f"Xnew has {Xnew.shape[-1]} input dimensions, X has {self.X.shape[-1]}"
            )
        if self._local_objective is not None:
            return self._local_forward(Xnew, full_cov, noiseless)
        with pyro.get_param_store().scope():
            overrides = self._median_hyperparameters()
            noise = self._noise_value(use_median=True)
            factor = _target_cholesky(self._target_covariance(overrides, noise))
            residual = (self.y - self._mean(self.X, overrides)).unsqueeze(-1)
            weights = torch.cholesky_solve(residual, factor).squeeze(-1)
            cross = self._kernel(self.X, Xnew, overrides)  # (N, M)
            mean = self._mean(Xnew, overrides) + cross.mT @ weights
            projected = torch.linalg.solve_triangular(factor, cross, upper=False)
            if full_cov:
                cov = self._kernel(Xnew, Xnew, overrides) - projected.mT @ projected
                if not noiseless:
                    cov = cov + noise * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
                return mean, cov
            var = self._kernel(Xnew, None, overrides, diag=True) - projected.square().sum(-2)
            var = var.clamp_min(0.0)
            if not noiseless:
                var = var + noise
            return mean, var

    def _local_forward(self, Xnew: torch.Tensor, full_cov: bool, noiseless: bool):
        """Local kriging from the ``context_size`` nearest training points of each input."""
        if full_cov:
            raise ValueError("full_cov=True is not available with context_size (local kriging)")
        with pyro.get_param_store().scope():
            overrides = self._median_hyperparameters()
            noise = self._noise_value(use_median=True)
            predictive = local_predict(
                lambda points: self._kernel(points, points, overrides),
                self.X,
                self.y,
                Xnew,
                noise + self.jitter,
                self.context_size,  # type: ignore[arg-type]
                mean=lambda x: self._mean(x, overrides),
                noiseless=noiseless,
                index=self._local_objective.index,  # type: ignore[union-attr]
            )
        return predictive.mean, predictive.variance

    def log_marginal_likelihood(self) -> torch.Tensor:
        """The exact :math:`\\log p(y \\mid X)` at the current hyperparameters (the guide's
        median for those with priors), a sum over data points."""
        with pyro.get_param_store().scope():
            overrides = self._median_hyperparameters()
            noise = self._noise_value(use_median=True)
            covariance = self._target_covariance(overrides, noise)
            loc = self._mean(self.X, overrides)
            return _GPTargetDistribution(loc, DenseLinearOperator(covariance)).log_prob(self.y)


def fit(
    gp: GPRegression,
    objective: str = "masked",
    mask: MaskLike = "cumulative",
    num_masks: Optional[NumMasks] = None,
    num_steps: int = 1000,
    lr: float = 0.01,
    lr_decay: float = 1.0,
    optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    seed: Optional[int] = None,
    progress: bool = True,
    history: Optional[list] = None,
    callback: Optional[Callable[[int, float], None]] = None,
    num_particles: int = 1,
) -> list:
    """Fit a :class:`GPRegression` by masked pre-training or by the exact evidence.

    Minimises, with a torch optimizer over ``gp.parameters()``,

    - ``objective="masked"``: the negative :class:`~pyro_masked.MaskedELBO` with the given
      ``mask`` and ``num_masks`` (``mask="cumulative"``: an unbiased estimate of the negative
      log evidence);
    - ``objective="exact"``: the negative :class:`~pyro.infer.Trace_ELBO`, i.e. the exact
      negative log evidence :math:`-\\log p(y \\mid X)` (plus the prior and guide terms for
      hyperparameters with priors: MAP with ``guide="delta"``).

    Losses are sums over the data points (Pyro's convention), not means as GPyTorch's
    marginal log likelihoods (:class:`~pyro_masked.MaskedMarginalLogLikelihood`) report.

    ``seed`` means what it means for :class:`~pyro_masked.MaskedMarginalLogLikelihood`:

    - ``seed=None`` (random masks): every step draws new masks from torch's global generator
      (call ``pyro.set_rng_seed`` first for a reproducible run), one permutation per step by
      default, for a stochastic optimizer such as the default :class:`torch.optim.Adam`.
    - ``seed`` an int (deterministic mode): every evaluation scores the same masks, drawn from
      a private :class:`torch.Generator` seeded by ``seed`` (the global generators are neither
      read nor reseeded), averaging
      :func:`~pyro_masked.gpytorch.deterministic_num_masks` ``(N)`` permutations by default:
      a fixed objective, as :class:`torch.optim.LBFGS` needs. The draws of ``guide="normal"``
      are still random; use ``guide="delta"`` with a deterministic optimizer.

    Every optimizer is stepped with a closure (``optimizer.step(closure)``), so
    :class:`torch.optim.LBFGS` works, e.g. ``fit(gp, optimizer=torch.optim.LBFGS, lr=1.0,
    num_steps=5, seed=0)`` (each step runs L-BFGS's ``max_iter`` iterations). The random-mask
    objective under L-BFGS warns with
    :class:`~pyro_masked.gpytorch.RandomMasksUnderDeterministicOptimizerWarning`. For anything
    else (another loop, Pyro's ``SVI`` or ``pyro.contrib.gp.util.train``), use ``gp.model`` and
    ``gp.guide`` with :class:`~pyro_masked.MaskedELBO` directly.

    A step whose loss or gradients are not finite, or whose factorization fails, raises
    (``FloatingPointError``, :class:`~pyro_masked.linalg.NotPositiveDefiniteError`) after
    restoring the parameters and the optimizer's state as they were before the step, so a
    failed step never leaves the hyperparameters half-updated.

    :param gp: the model.
    :param objective: ``"masked"`` or ``"exact"``.
    :param mask: the mask schedule of the masked objective
        (see :func:`~pyro_masked.masked_log_prob`).
    :param num_masks: permutations averaged per evaluation, or ``None``: 1 with random masks,
        :func:`~pyro_masked.gpytorch.deterministic_num_masks` ``(N)`` with a ``seed``.
    :param num_steps: optimizer steps.
    :param lr: the initial learning rate.
    :param lr_decay: the final learning rate over the initial one, reached by exponential decay
        (``1.0``: constant). Decaying it averages out the noise of random masks at the end.
    :param optimizer: a torch optimizer class (default :class:`torch.optim.Adam`), called as
        ``optimizer(params, lr=lr)``.
    :param seed: an int for the deterministic mode (fixed masks), or ``None`` for random masks.
    :param progress: show a tqdm progress bar.
    :param history: a list the loss of each step is appended to as training runs (early access
        from another thread or a callback); a new list is used when omitted.
    :param callback: called as ``callback(step, loss)`` after each step.
    :param num_particles: ELBO particles (matters with ``guide="normal"``).
    :returns: the list of losses, one per step (for L-BFGS, the loss at the step's start).
    """
    if not isinstance(gp, GPRegression):
        raise TypeError(f"gp must be a GPRegression, got {type(gp).__name__}")
    if objective not in ("masked", "exact"):
        raise ValueError(f"objective must be 'masked' or 'exact', got {objective!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must lie in (0, 1], got {lr_decay!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if num_masks is None:
        num_masks = 1 if seed is None else deterministic_num_masks(gp.X.shape[0])

    def make_elbo() -> Trace_ELBO:
        if objective == "exact":
            return Trace_ELBO(num_particles=num_particles)
        # The deterministic mode re-seeds a private generator for every evaluation.
        generator = None if seed is None else private_generator(seed, gp.X.device)
        return MaskedELBO(
            num_particles=num_particles, mask=mask, num_masks=num_masks, generator=generator
        )

    make_elbo()  # validates mask, num_masks and num_particles before anything runs
    history = [] if history is None else history
    with pyro.get_param_store().scope():
        params = [p for p in gp.parameters() if p.requires_grad]
        optim = (optimizer or torch.optim.Adam)(params, lr=lr)
        if objective == "masked" and seed is None and isinstance(optim, torch.optim.LBFGS):
            warnings.warn(
                "fit(objective='masked', seed=None) draws new masks at every evaluation, but "
                "L-BFGS assumes a fixed objective: pass seed=0 (or any int) for the "
                "deterministic mode",
                RandomMasksUnderDeterministicOptimizerWarning,
                stacklevel=2,
            )
        bar = tqdm(range(num_steps), desc=f"fit ({objective})", disable=not progress)
        for step in bar:
            for group in optim.param_groups:
                group["lr"] = lr * lr_decay ** (step / max(1, num_steps - 1))

            def closure(step: int = step) -> torch.Tensor:
                optim.zero_grad()
                loss = make_elbo().differentiable_loss(gp.model, gp.guide)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: the loss is {loss.item()}")
                loss.backward()
                if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in params):
                    raise FloatingPointError(f"step {step}: non-finite gradients")
                return loss.detach()

            value = float(_guarded_step(optim, params, closure, step))
            history.append(value)
            bar.set_postfix(loss=f"{value:.4g}")
            if callback is not None:
                callback(step, value)
    return history


def _guarded_step(
    optim: torch.optim.Optimizer, params: list, closure: Callable[[], torch.Tensor], step: int
) -> torch.Tensor:
    """``optim.step(closure)``, undone if it raises or leaves a parameter non-finite."""
    saved_params = [p.detach().clone() for p in params]
    saved_state = {
        key: {name: (v.clone() if isinstance(v, torch.Tensor) else v) for name, v in state.items()}
        for key, state in optim.state.items()
    }

    def restore() -> None:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.copy_(saved)
        optim.state.clear()
        optim.state.update(saved_state)

    try:
        loss = optim.step(closure)  # type: ignore[arg-type]
    except BaseException:
        restore()
        raise
    if all(torch.isfinite(p).all() for p in params):
        return loss  # type: ignore[return-value]
    restore()
    raise FloatingPointError(f"step {step}: the update made a parameter non-finite; undone")

"""Data-parallel masked training and evidence across processes (``torch.distributed``).

A masked objective is a sum over data points, so it splits across processes (ranks) the way any
Pyro loss with a subsampled plate does. Three things make the split exact:

**Independent masks on every rank.** The masks (random permutations of the coordinates), and
any other randomness of a step — guide samples, importance samples of ``integrate=`` latents —
are drawn from torch's global generator. Seeding every rank with the same seed (what
``lightning.seed_everything`` does) makes every rank draw the *same* masks, so the ranks'
estimates are correlated and averaging them removes less variance than it should.
:class:`RankRandomness` gives each rank a private stream, seeded by ``(seed, rank)`` through
NumPy's :class:`~numpy.random.SeedSequence` (statistically independent streams from one seed),
that is swapped in only while a step runs: runs are reproducible from one seed, and the caller's
global generator is left where it was.

**No loss scale under DDP's gradient averaging.** Let the plate have size :math:`N` and the
global batch of :math:`B` data points be split into :math:`W` equal parts of :math:`b = B/W`,
one per rank, each declared to the plate as its subsample,
``pyro.plate("data", N, subsample_size=b)``. Pyro scales rank :math:`r`'s data terms by
:math:`N/b`, so its loss is

.. math::

    L_r = \\frac{N}{b} \\sum_{n \\in B_r} \\ell_n + G,

with :math:`\\ell_n` the negative masked score of data point :math:`n` and :math:`G` the terms
of global sites (:math:`\\log q - \\log p` of global latents), present once on every rank.
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients over ranks:

.. math::

    \\frac{1}{W} \\sum_{r=1}^{W} \\nabla L_r
    = \\frac{N}{W b} \\sum_{n \\in B} \\nabla \\ell_n + \\nabla G
    = \\frac{N}{B} \\sum_{n \\in B} \\nabla \\ell_n + \\nabla G,

which is the gradient of the one-process loss over the global batch (subsample size :math:`B`),
an unbiased estimate of the full-data gradient. So the loss needs no extra scale; the conditions
are equal local batch sizes (:class:`~torch.utils.data.distributed.DistributedSampler` pads the
data to a multiple of :math:`W`) and the *local* batch size as the plate's ``subsample_size``.
(Scaling the data terms by :math:`N/B` on every rank would make them :math:`W` times too
small.) A masked
score of a whole batch shares one permutation per observed site, so the one-process run sees the
same masks only when it scores each rank's part under that rank's stream. The same argument
covers the local-context GP of :mod:`pyro_masked.local`, whose minibatch estimate
:math:`N \\cdot \\frac1b \\sum_{j \\in B_r} \\log p(y_j \\mid y_{C_j})` is a mean over the
rank's hidden points: averaged over ranks it is the estimate from the global batch.

**Evidence estimates add up.** Ranks that estimate the evidence of disjoint shards of iid data
(each shard scored without subsampling) hold independent estimates of
:math:`\\log p(x_{B_r})`, and :math:`\\log p(x) = \\sum_r \\log p(x_{B_r})`:
:func:`reduce_log_marginal` sums the estimates and adds their variances,
:math:`\\mathrm{se}^2 = \\sum_r \\mathrm{se}_r^2`, with one collective.

Lightning users get :class:`MaskedLightningModule` (it needs the ``distributed`` extra,
``pip install pyro_masked[distributed]``), a training plan like Pyro's ``svi_lightning``
example with per-rank masks. Cost: nothing beyond DDP's own all-reduce of the gradients per
step; a reduction of evidence estimates moves :math:`O(R + n)` numbers per rank.

References:

- S. Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel Training",
  VLDB 2020 (DDP's gradient averaging).
- Pyro's ``examples/svi_lightning.py`` (SVI with an ``ELBOModule`` in Lightning).
- NumPy's :class:`~numpy.random.SeedSequence` (independent streams from one seed).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

from pyro_masked.diagnostics import LogMarginalEstimate, MaskRateCurve
from pyro_masked.local import LocalLogMarginalEstimate
from pyro_masked.util import private_generator

__all__ = [
    "MaskedLightningModule",  # noqa: F822 (built on first access by __getattr__)
    "RankRandomness",
    "rank_generator",
    "rank_seed",
    "reduce_log_marginal",
]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed}")
    return int(seed)


def _check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be a non-negative int, got {rank!r}")
    if rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank}")
    return int(rank)


def _current_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_seed(seed: int, rank: Optional[int] = None) -> int:
    """The seed (63 bits) of rank ``rank``'s stream, derived from one ``seed``.

    Hashes ``(seed, rank)`` with NumPy's :class:`~numpy.random.SeedSequence` (the rank is its
    spawn key), so nearby seeds and ranks give unrelated streams.

    :param seed: the run's seed, a non-negative int.
    :param rank: the process's rank; ``None`` reads it from ``torch.distributed`` (0 when no
        process group is initialized).
    """
    seed = _check_seed(seed)
    rank = _current_rank() if rank is None else _check_rank(rank)
    sequence = np.random.SeedSequence(entropy=seed, spawn_key=(rank,))
    # 63 bits: torch takes the seed as a signed 64-bit int on some paths.
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def rank_generator(
    seed: int,
    rank: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Generator:
    """A private :class:`torch.Generator` for this rank's masks, seeded by ``(seed, rank)``.

    For the ``generator=`` argument of :class:`~pyro_masked.MaskedELBO`,
    :func:`~pyro_masked.masked` and :func:`~pyro_masked.masked_log_prob`, which draw only the
    permutations from it::

        elbo = MaskedELBO(generator=rank_generator(seed=0))

    Guide samples, importance samples of ``integrate=`` latents and plate subsamples still
    come from torch's global generator; :class:`RankRandomness` gives all of them a per-rank
    stream.

    :param seed: the run's seed (the same on every rank), a non-negative int.
    :param rank: the process's rank; ``None`` reads it from ``torch.distributed``.
    :param device: where the masks are drawn (a CUDA generator for data on the GPU).
    """
    return private_generator(rank_seed(seed, rank), device)


class RankRandomness:
    """A private random stream per rank, swapped in for torch's global generator in a block.

    Masks, guide samples and importance samples are drawn from torch's global generator when
    the loss is computed — after the model has run, when Pyro scores the trace — so the
    stream must cover the whole loss call, not just the model::

        randomness = RankRandomness(seed=0)  # rank from torch.distributed
        for batch in loader:
            with randomness:
                loss = loss_fn(*batch)
            loss.backward()

    On entering, the global generator's state is saved and this rank's stream is loaded; on
    leaving, the stream's advanced state is kept and the global state restored. Each entry
    continues the stream where the previous one stopped, so a run is reproducible from
    ``seed`` and the ranks' masks are independent. Also usable as a decorator.

    :param seed: the run's seed (the same on every rank), a non-negative int.
    :param rank: the process's rank; ``None`` reads it from ``torch.distributed`` on first use
        (0 when no process group is initialized).
    :param device: a CUDA device whose generator is swapped too, for masks drawn on the GPU
        (the CPU generator is always swapped); ``None`` for CPU only.
    """

    def __init__(
        self,
        seed: int,
        rank: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
    ):
        self.seed = _check_seed(seed)
        self.rank = None if rank is None else _check_rank(rank)
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {self.device}")
        if self.device is not None and self.device.type == "cpu":
            self.device = None
        self._stream: Optional[dict] = None  # generator name -> state of this rank's stream
        self._saved: Optional[dict] = None  # generator name -> global state while inside

    def __repr__(self) -> str:
        return f"RankRandomness(seed={self.seed}, rank={self.rank}, device={self.device})"

    def _cuda_index(self) -> int:
        index = self.device.index  # type: ignore[union-attr]
        return torch.cuda.current_device() if index is None else index

    def _initial_stream(self) -> dict:
        if self.rank is None:
            self.rank = _current_rank()
        stream = {"cpu": rank_generator(self.seed, self.rank).get_state()}
        if self.device is not None:
            device = torch.device("cuda", self._cuda_index())
            stream["cuda"] = rank_generator(self.seed, self.rank, device).get_state()
        return stream

    def _global_states(self) -> dict:
        states = {"cpu": torch.get_rng_state()}
        if self.device is not None:
            states["cuda"] = torch.cuda.get_rng_state(self._cuda_index())
        return states

    def _load(self, states: dict) -> None:
        torch.set_rng_state(states["cpu"])
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"], self._cuda_index())

    def __enter__(self) -> RankRandomness:
        if self._saved is not None:
            raise RuntimeError(f"{self!r} is already active; it cannot be entered twice")
        if self._stream is None:
            self._stream = self._initial_stream()
        self._saved = self._global_states()
        self._load(self._stream)
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        self._stream = self._global_states()
        self._load(self._saved)  # type: ignore[arg-type]
        self._saved = None

    def __call__(self, fn: Callable) -> Callable:
        """``fn`` run under this rank's stream: ``RankRandomness(seed)(loss_fn)``."""

        def run_with_rank_randomness(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        run_with_rank_randomness.__wrapped__ = fn  # type: ignore[attr-defined]
        return run_with_rank_randomness


# --------------------------------------------------------------------------------------------
# Evidence across ranks
# --------------------------------------------------------------------------------------------

_REDUCTIONS = ("sum", "mean")

# How each field of a diagnostics result combines over ranks: estimates (and draws, and the
# curve's per-rate scores) add up; standard errors add in quadrature; ``exact`` adds up where
# every rank knows it. Fields not listed (rates, mask sizes, the schedule) must agree.
_SUMMED, _QUADRATURE = "summed", "quadrature"
_FIELDS = {
    LogMarginalEstimate: {
        "estimate": _SUMMED,
        "stderr": _QUADRATURE,
        "unmasked": _SUMMED,
        "draws": _SUMMED,
        "exact": _SUMMED,
    },
    MaskRateCurve: {
        "scores": _SUMMED,
        "stderrs": _QUADRATURE,
        "estimates": _SUMMED,
        "estimate_stderrs": _QUADRATURE,
        "area": _SUMMED,
        "area_stderr": _QUADRATURE,
        "exact": _SUMMED,
    },
    LocalLogMarginalEstimate: {
        "estimate": _SUMMED,
        "stderr": _QUADRATURE,
        "stderr_unstratified": _QUADRATURE,
    },
}
_PAIR_FIELDS = {"estimate": _SUMMED, "stderr": _QUADRATURE}


def _reduce_device(group) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo and MPI take CPU tensors.
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"result's {name} must be a real number, got {value!r}")
    return float(value)


def _fields_of(result) -> tuple[dict, dict]:
    """The values to combine (name -> float or tensor, ``None`` if unknown) and their rules."""
    if isinstance(result, (tuple, list)) and len(result) == 2:
        values = {name: _as_number(value, name) for name, value in zip(_PAIR_FIELDS, result)}
        return values, _PAIR_FIELDS
    rules = _FIELDS.get(type(result))
    if rules is None:
        raise TypeError(
            "result must be an (estimate, stderr) pair, a LogMarginalEstimate, a "
            f"MaskRateCurve or a LocalLogMarginalEstimate, got {type(result).__name__}"
        )
    return {name: getattr(result, name) for name in rules}, rules


def _check_finite(values: dict, rules: dict) -> None:
    for name, value in values.items():
        if value is None:
            continue
        tensor = torch.as_tensor(value, dtype=torch.float64)
        if not torch.isfinite(tensor).all():
            raise ValueError(f"result's {name} must be finite, got {value}")
        if rules[name] == _QUADRATURE and (tensor < 0).any():
            raise ValueError(f"result's {name} must be >= 0 (a standard error), got {value}")


def _signature(result, values: dict) -> tuple:
    """What must agree over ranks for their results to combine."""
    shapes = tuple(
        (name, None if value is None else tuple(torch.as_tensor(value).shape))
        for name, value in values.items()
    )
    fixed: tuple[tuple[str, str], ...] = ()
    if dataclasses.is_dataclass(result):
        rules = _FIELDS[type(result)]
        fixed = tuple(
            (f.name, repr(_plain(getattr(result, f.name))))
            for f in dataclasses.fields(result)
            if f.name not in rules
        )
    return (type(result).__name__, shapes, fixed)


def _plain(value):
    return value.tolist() if isinstance(value, torch.Tensor) else value


def reduce_log_marginal(
    result: Any,
    reduction: str = "sum",
    group: Optional[dist.ProcessGroup] = None,
) -> Any:
    """Combine every rank's evidence estimate into one, with its standard error.

    Each rank holds an estimate :math:`\\hat L_r` with standard error :math:`s_r`, drawn with
    independent masks (see :class:`RankRandomness`). With ``reduction="sum"`` the ranks
    estimate disjoint shards of iid data, each scored without subsampling, and

    .. math::

        \\hat L = \\sum_r \\hat L_r, \\qquad s^2 = \\sum_r s_r^2

    estimates :math:`\\log p(x) = \\sum_r \\log p(x_{B_r})`: variances of independent
    estimates add. Parameters must be point estimates (no guide latents), as
    :math:`\\log p(z) - \\log q(z)` of global latents would be counted once per rank. With
    ``reduction="mean"`` every rank estimates the same quantity (e.g. with plates subsampled
    and scaled to the full data) and :math:`\\hat L = \\frac1W \\sum_r \\hat L_r`,
    :math:`s^2 = \\frac1{W^2} \\sum_r s_r^2`.

    For a :class:`~pyro_masked.LogMarginalEstimate`, ``estimate``, ``unmasked`` and ``exact``
    combine like :math:`\\hat L` and ``stderr`` like :math:`s`; draw :math:`i` of the result
    combines every rank's draw :math:`i` (an independent draw of :math:`\\hat L`). For a
    :class:`~pyro_masked.MaskRateCurve` computed on the same rate grid, ``scores``,
    ``estimates`` and ``area`` combine like :math:`\\hat L` and their standard errors like
    :math:`s`, rate by rate; ``exact`` combines like :math:`\\hat L` (the ranks must agree on
    whether it is known). A :class:`~pyro_masked.local.LocalLogMarginalEstimate` of a large GP
    is already an estimate of the whole :math:`\\log p(y)` on every rank (its minibatches of
    hidden points are drawn from all :math:`N`): combine it with ``reduction="mean"``, which
    pools the ranks' minibatches.

    One ``all_gather_object`` checks that the ranks' results are alike (so that every rank
    raises the same error and none is left waiting) and one ``all_reduce`` combines them: a
    collective, so every rank of ``group`` must call it. Cost: :math:`O(R + n)` numbers per
    rank for ``R`` rates and ``n`` draws.

    :param result: a :class:`~pyro_masked.LogMarginalEstimate`, a
        :class:`~pyro_masked.MaskRateCurve`, a
        :class:`~pyro_masked.local.LocalLogMarginalEstimate`, or an ``(estimate, stderr)``
        pair of numbers.
    :param reduction: ``"sum"`` (disjoint shards) or ``"mean"`` (replicates).
    :param group: the process group; the default group when ``None``.
    :returns: the same kind as ``result``: a pair of floats, or a copy of the result with its
        fields combined.
    :raises ValueError: for a bad ``reduction`` (before any collective, so pass the same on
        every rank); on every rank when a rank's result is not finite or has a negative
        standard error, or when the ranks' results differ in kind, schedule, rates, number
        of draws or in whether ``exact`` is known.
    :raises TypeError: on the rank whose ``result`` is of the wrong kind (the others raise
        ``ValueError`` naming it).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "reduce_log_marginal needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    # A bad result is reported to every rank before it raises, so that none is left waiting
    # in the reduction for a rank that has given up.
    problem: Optional[Exception] = None
    try:
        values, rules = _fields_of(result)
        _check_finite(values, rules)
        signature = _signature(result, values)
    except (TypeError, ValueError) as error:
        problem, signature = error, None
    world_size = dist.get_world_size(group)
    gathered: list = [None] * world_size
    report = None if problem is None else f"{type(problem).__name__}: {problem}"
    dist.all_gather_object(gathered, (signature, report), group=group)
    if problem is not None:
        raise problem
    failed = [(rank, report) for rank, (_, report) in enumerate(gathered) if report is not None]
    if failed:
        raise ValueError(
            f"another rank's result cannot be combined: rank {failed[0][0]}: {failed[0][1]}"
        )
    signatures = [signature for signature, _ in gathered]
    if any(other != signatures[0] for other in signatures):
        raise ValueError(
            "the ranks' results differ and cannot be combined (kind, shapes of the combined "
            f"fields, and the fields that must agree, by rank): {signatures}"
        )

    known = [name for name, value in values.items() if value is not None]
    device = _reduce_device(group)
    parts = []
    for name in known:
        part = torch.as_tensor(values[name], dtype=torch.float64).detach().to(device)
        parts.append(part.reshape(-1) ** 2 if rules[name] == _QUADRATURE else part.reshape(-1))
    packed = torch.cat(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    packed = packed.cpu()
    divisor = 1.0 if reduction == "sum" else float(world_size)

    combined: dict = {}
    offset = 0
    for name in known:
        original = values[name]
        shape = torch.as_tensor(original).shape
        size = shape.numel()
        total = packed[offset : offset + size]
        offset += size
        total = (total.sqrt() if rules[name] == _QUADRATURE else total) / divisor
        if isinstance(original, torch.Tensor):
            combined[name] = total.reshape(shape).to(dtype=original.dtype)
        else:
            combined[name] = float(total[0])
    if not dataclasses.is_dataclass(result):
        return combined["estimate"], combined["stderr"]
    return dataclasses.replace(result, **combined)  # type: ignore[type-var]


# --------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------


def _import_lightning():
    try:
        import lightning
    except ImportError as error:
        raise ImportError(
            "MaskedLightningModule needs PyTorch Lightning, an optional dependency: "
            "pip install pyro_masked[distributed]"
        ) from error
    return lightning


def _make_lightning_module(lightning) -> type:
    class MaskedLightningModule(lightning.LightningModule):
        """A Lightning training plan for a masked loss, with independent masks per rank.

        Wraps an :class:`~pyro.infer.elbo.ELBOModule` (``MaskedELBO(...)(model, guide)``)
        as Pyro's ``svi_lightning`` example does: the training step is the loss of the
        batch, computed under this rank's :class:`RankRandomness` stream, and the optimizer
        sees the loss module's parameters. Under the DDP strategy the gradients are averaged
        over ranks, which is the gradient over the global batch when the model's plate is
        given the local batch size (see :mod:`pyro_masked.distributed`).

        Run the loss once on a batch before ``Trainer.fit`` so that lazily created
        parameters (autoguides) exist when the optimizer and DDP are set up.

        :param loss_fn: the loss module, ``MaskedELBO(...)(model, guide)``.
        :param lr: the learning rate of the default optimizer, :class:`torch.optim.Adam`.
        :param seed: the seed of the masks' streams (the same on every rank).
        :param optimizer: a function from the parameters to a :class:`torch.optim.Optimizer`,
            replacing Adam (``lr`` is then unused).
        """

        def __init__(
            self,
            loss_fn: torch.nn.Module,
            lr: float = 0.01,
            seed: int = 0,
            optimizer: Optional[Callable[[Iterable[torch.nn.Parameter]], Any]] = None,
        ):
            super().__init__()
            if not isinstance(loss_fn, torch.nn.Module):
                raise TypeError(
                    "loss_fn must be a loss module, MaskedELBO(...)(model, guide), got "
                    f"{type(loss_fn).__name__}"
                )
            if optimizer is None and not (isinstance(lr, numbers.Real) and lr > 0):
                raise ValueError(f"lr must be a positive number, got {lr!r}")
            self.loss_fn = loss_fn
            self.lr = lr
            self.seed = _check_seed(seed)
            self.optimizer_factory = optimizer
            self.randomness: Optional[RankRandomness] = None

        def setup(self, stage: str) -> None:
            """Open this rank's mask stream (Lightning knows the rank and device by now)."""
            # The strategy's device: the module itself is moved there only after this hook.
            root = self.trainer.strategy.root_device
            device = root if root.type == "cuda" else None
            current = self.randomness
            if current is None or (current.rank, current.device) != (self.global_rank, device):
                # A second fit continues the stream; a new rank or device starts its own.
                self.randomness = RankRandomness(self.seed, rank=self.global_rank, device=device)

        def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            """The masked loss of the model's arguments, with this rank's masks."""
            if self.randomness is None:
                self.randomness = RankRandomness(self.seed)
            with self.randomness:
                return self.loss_fn(*args, **kwargs)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            """The loss of this rank's part of the global batch, logged as ``train_loss``."""
            # A batch is the model's arguments: a tuple (TensorDataset), a dict of keyword
            # arguments, or one tensor.
            if isinstance(batch, (tuple, list)):
                loss = self(*batch)
            elif isinstance(batch, dict):
                loss = self(**batch)
            else:
                loss = self(batch)
            self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=_size(batch))
            return loss

        def configure_optimizers(self) -> Any:
            """Adam over the loss module's parameters, or the ``optimizer`` given."""
            if self.optimizer_factory is not None:
                return self.optimizer_factory(self.loss_fn.parameters())
            return torch.optim.Adam(self.loss_fn.parameters(), lr=self.lr)

    # Pickled by name (ddp_spawn, checkpoints), found through the module's __getattr__.
    MaskedLightningModule.__module__ = __name__
    MaskedLightningModule.__qualname__ = "MaskedLightningModule"
    return MaskedLightningModule


def _size(batch) -> int:
    if isinstance(batch, (tuple, list)):
        batch = batch[0] if batch else None
    elif isinstance(batch, dict):
        batch = next(iter(batch.values()), None)
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) and batch.dim() else 1


_lazy: dict = {}


def __getattr__(name: str):
    # The Lightning class is built on first access, so that importing this module does not
    # need Lightning.
    if name == "MaskedLightningModule":
        if name not in _lazy:
            _lazy[name] = _make_lightning_module(_import_lightning())
        return _lazy[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

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
(With the global size there the data terms would be :math:`W` times too small.) A masked
score of a whole batch shares one permutation per observed site, so the one-process run sees the
same masks only when it scores each rank's part under that rank's stream.

**Evidence estimates add up.** Ranks that estimate the evidence of disjoint shards of iid data
(each shard scored without subsampling) hold independent estimates of
:math:`\\log p(x_{B_r})`, and :math:`\\log p(x) = \\sum_r \\log p(x_{B_r})`:
:func:`reduce_log_marginal` sums the estimates and adds their variances,
:math:`\\mathrm{se}^2 = \\sum_r \\mathrm{se}_r^2`, with one collective.

Lightning users get :class:`MaskedLightningModule` (it needs the ``distributed`` extra,
``pip install pyro_masked[distributed]``), a training plan like Pyro's ``svi_lightning``
example with per-rank masks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "MaskedLightningModule",  # noqa: F822 (built on first access by __getattr__)
    "RankRandomness",
    "rank_seed",
    "reduce_log_marginal",
]

EstimatePair = tuple[float, float]


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
    """The 64-bit seed of rank ``rank``'s stream, derived from one ``seed``.

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
        index = self.device.index
        return torch.cuda.current_device() if index is None else index

    def _initial_stream(self) -> dict:
        if self.rank is None:
            self.rank = _current_rank()
        seed = rank_seed(self.seed, self.rank)
        stream = {"cpu": torch.Generator().manual_seed(seed).get_state()}
        if self.device is not None:
            device = torch.device("cuda", self._cuda_index())
            stream["cuda"] = torch.Generator(device=device).manual_seed(seed).get_state()
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
        self._load(self._saved)
        self._saved = None

    def __call__(self, fn: Callable) -> Callable:
        def run_with_rank_randomness(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)

        run_with_rank_randomness.__wrapped__ = fn  # type: ignore[attr-defined]
        return run_with_rank_randomness


# --------------------------------------------------------------------------------------------
# Evidence across ranks
# --------------------------------------------------------------------------------------------

_REDUCTIONS = ("sum", "mean")


def _reduce_device(group) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo and MPI take CPU tensors.
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_pair(result) -> Optional[EstimatePair]:
    if isinstance(result, (tuple, list)) and len(result) == 2:
        estimate, stderr = result
        for name, value in (("estimate", estimate), ("stderr", stderr)):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"result's {name} must be a real number, got {value!r}")
        return float(estimate), float(stderr)
    return None


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

    One ``all_gather_object`` checks that the ranks' results are alike (so that every rank
    raises the same error and none is left waiting) and one ``all_reduce`` combines them: a
    collective, so every rank of ``group`` must call it.

    :param result: a :class:`~pyro_masked.LogMarginalEstimate` (or any frozen dataclass with
        ``estimate`` and ``stderr`` fields), or an ``(estimate, stderr)`` pair.
    :param reduction: ``"sum"`` (disjoint shards) or ``"mean"`` (replicates).
    :param group: the process group; the default group when ``None``.
    :returns: the same kind as ``result``: a pair of floats, or a copy of the dataclass with
        ``estimate`` and ``stderr`` combined, ``exact`` and ``unmasked`` combined the same way
        (``exact`` is ``None`` unless every rank knows it) and ``draws`` the combined draws
        (draw :math:`i` of the total is the sum, or mean, of every rank's draw :math:`i`, an
        independent draw of :math:`\\hat L`).
    :raises ValueError: on a single rank, before any collective, for a bad ``reduction``; on
        every rank when the ranks' results differ in kind, mask schedule or number of draws.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "reduce_log_marginal needs an initialized torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    pair = _as_pair(result)
    is_record = pair is None and dataclasses.is_dataclass(result) and not isinstance(result, type)
    if is_record:
        names = {f.name for f in dataclasses.fields(result)}
        if not {"estimate", "stderr"} <= names:
            is_record = False
    if pair is None and not is_record:
        raise TypeError(
            "result must be an (estimate, stderr) pair or a LogMarginalEstimate, got "
            f"{type(result).__name__}"
        )
    if is_record:
        pair = float(result.estimate), float(result.stderr)
    estimate, stderr = pair
    if not (math.isfinite(estimate) and math.isfinite(stderr)) or stderr < 0:
        raise ValueError(f"result must hold a finite estimate and a finite stderr >= 0, got {pair}")

    world_size = dist.get_world_size(group)
    signature = _signature(result) if is_record else ("pair",)
    signatures = [None] * world_size
    dist.all_gather_object(signatures, signature, group=group)
    if any(other != signatures[0] for other in signatures):
        raise ValueError(
            "the ranks' results differ and cannot be combined: (kind, num_masks, mask, "
            f"number of draws, exact known) by rank: {signatures}"
        )

    exact = getattr(result, "exact", None) if is_record else None
    unmasked = getattr(result, "unmasked", None) if is_record else None
    draws = getattr(result, "draws", None) if is_record else None
    scalars = [estimate, stderr**2, 0.0 if exact is None else float(exact)]
    scalars.append(0.0 if unmasked is None else float(unmasked))
    device = _reduce_device(group)
    packed = torch.tensor(scalars, dtype=torch.float64, device=device)
    if isinstance(draws, torch.Tensor):
        packed = torch.cat([packed, draws.detach().to(device=device, dtype=torch.float64)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    divisor = 1.0 if reduction == "sum" else float(world_size)
    total = packed.cpu() / divisor
    estimate_total = float(total[0])
    stderr_total = math.sqrt(float(packed[1].cpu())) / divisor
    if not is_record:
        return estimate_total, stderr_total
    changes: dict = {"estimate": estimate_total, "stderr": stderr_total}
    if "exact" in names:
        changes["exact"] = None if exact is None else float(total[2])
    if "unmasked" in names and unmasked is not None:
        changes["unmasked"] = float(total[3])
    if isinstance(draws, torch.Tensor):
        changes["draws"] = total[4:].to(dtype=draws.dtype)
    return dataclasses.replace(result, **changes)


def _signature(result) -> tuple:
    draws = getattr(result, "draws", None)
    return (
        type(result).__name__,
        repr(getattr(result, "num_masks", None)),
        repr(getattr(result, "mask", None)),
        None if not isinstance(draws, torch.Tensor) else tuple(draws.shape),
        getattr(result, "exact", None) is not None,
    )


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
            # The strategy's device: the module itself is moved there only after this hook.
            root = self.trainer.strategy.root_device
            device = root if root.type == "cuda" else None
            self.randomness = RankRandomness(self.seed, rank=self.global_rank, device=device)

        def forward(self, *batch) -> torch.Tensor:
            if self.randomness is None:
                self.setup("fit")
            with self.randomness:
                return self.loss_fn(*batch)

        def training_step(self, batch, batch_idx: int) -> torch.Tensor:
            loss = self(*batch)
            self.log("train_loss", loss, on_step=True, on_epoch=False, batch_size=_size(batch))
            return loss

        def configure_optimizers(self):
            if self.optimizer_factory is not None:
                return self.optimizer_factory(self.loss_fn.parameters())
            return torch.optim.Adam(self.loss_fn.parameters(), lr=self.lr)

    # Pickled by name (ddp_spawn, checkpoints), found through the module's __getattr__.
    MaskedLightningModule.__module__ = __name__
    MaskedLightningModule.__qualname__ = "MaskedLightningModule"
    return MaskedLightningModule


def _size(batch) -> int:
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else 1


_lazy: dict = {}


def __getattr__(name: str):
    # The Lightning class is built on first access, so that importing this module does not
    # need Lightning.
    if name == "MaskedLightningModule":
        if name not in _lazy:
            _lazy[name] = _make_lightning_module(_import_lightning())
        return _lazy[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

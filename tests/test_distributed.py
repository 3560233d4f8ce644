"""Data-parallel masked training and evidence on 2 CPU processes (gloo).

One module-scoped run spawns 2 ranks that train PPCA over a subsampled plate, a latent model
with ``integrate=`` and a local-context GP under ``DistributedDataParallel``, train PPCA with
Lightning's DDP strategy, draw masks and reduce evidence estimates; each rank saves what it
found. The tests
compare those results with one process that computes the same minibatches and masks itself.
The spawned ranks are joined with a deadline and killed past it, and every collective has a
timeout, so a rank that fails or hangs fails the tests instead of hanging them.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time

import gpytorch
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from conftest import requires_cuda
from pyro.nn import PyroModule
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from pyro_masked import (
    MaskedELBO,
    MaskedMarginalLogLikelihood,
    estimate_log_marginal,
    mask_rate_curve,
    masked_log_prob,
)
from pyro_masked.distributed import (
    RankRandomness,
    rank_generator,
    rank_seed,
    reduce_log_marginal,
)
from pyro_masked.local import LocalMaskedObjective, estimate_local_log_marginal, local_predict

WORLD_SIZE = 2
SEED = 20261126
DEADLINE_SECONDS = 150
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)

NUM_POINTS = 48  # the plate's size: 3 steps of a global batch of 16 (8 per rank)
LOCAL_BATCH = 8
DIM = 4
STEPS_LR = 0.05
SGD_LR = 2e-4


# --------------------------------------------------------------------------------------------
# The problems, built identically on every rank and in the test process
# --------------------------------------------------------------------------------------------


class PPCA(PyroModule):
    """Probabilistic PCA with the data points in a subsampled plate of size ``size``."""

    def __init__(self, size: int, dim: int = DIM, rank: int = 1):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.size = size
        self.loc = torch.nn.Parameter(torch.zeros(dim))
        self.loadings = torch.nn.Parameter(0.5 * torch.randn(dim, rank, generator=generator))
        self.log_noise = torch.nn.Parameter(torch.tensor(-0.5))

    def forward(self, data: torch.Tensor) -> None:
        # The local batch is the plate's subsample: Pyro scales its terms by size / len(data).
        with pyro.plate("data", self.size, subsample_size=data.shape[0]):
            noise = self.log_noise.exp().expand(self.loc.shape[-1])
            fn = dist.LowRankMultivariateNormal(self.loc, self.loadings, noise)
            pyro.sample("obs", fn, obs=data)


class BinaryFactor(PyroModule):
    """A latent factor model with Bernoulli coordinates; ``z`` is integrated by sampling."""

    def __init__(self, size: int, dim: int = 6, latent: int = 2):
        super().__init__()
        generator = torch.Generator().manual_seed(2)
        self.size = size
        self.latent = latent
        self.weight = torch.nn.Parameter(0.3 * torch.randn(dim, latent, generator=generator))
        self.bias = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, data: torch.Tensor) -> None:
        with pyro.plate("data", self.size, subsample_size=data.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent]).to_event(1))
            logits = z @ self.weight.T + self.bias
            pyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=data)


class EmptyGuide(PyroModule):
    def forward(self, data: torch.Tensor) -> None:
        return None


def ppca_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    latent = torch.randn(NUM_POINTS, 1, generator=generator)
    loadings = torch.tensor([[1.5], [-1.0], [0.5], [2.0]])
    noise = 0.5 * torch.randn(NUM_POINTS, DIM, generator=generator)
    return latent @ loadings.T + noise + 0.3


def binary_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(4)
    z = torch.randn(NUM_POINTS, 2, generator=generator)
    weight = 2.0 * torch.randn(6, 2, generator=generator)
    return torch.bernoulli(torch.sigmoid(z @ weight.T), generator=generator)


def make_problem(name: str):
    """The loss module (fresh parameters) and data of a training problem."""
    if name == "ppca_all":
        model, elbo, data = PPCA(NUM_POINTS), MaskedELBO(num_masks="all"), ppca_data()
    elif name == "ppca":
        model, elbo, data = PPCA(NUM_POINTS), MaskedELBO(num_masks=2), ppca_data()
    elif name == "latent":
        elbo = MaskedELBO(integrate=("z",), num_samples=8, max_plate_nesting=1)
        model, data = BinaryFactor(NUM_POINTS), binary_data()
    else:
        raise ValueError(name)
    return elbo(model, EmptyGuide()), data


def optimizer_for(name: str, parameters) -> torch.optim.Optimizer:
    # Plain SGD where the scale of the loss is under test: Adam's steps barely change when the
    # loss is multiplied by a constant, so they would not show a wrong loss scale.
    if name == "ppca_all":
        return torch.optim.SGD(parameters, lr=SGD_LR)
    return torch.optim.Adam(parameters, lr=STEPS_LR)


def rank_loader(data: torch.Tensor, rank: int) -> DataLoader:
    """Rank ``rank``'s minibatches, as DistributedSampler (without shuffling) deals them."""
    dataset = TensorDataset(data)
    sampler = DistributedSampler(dataset, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
    return DataLoader(dataset, batch_size=LOCAL_BATCH, sampler=sampler)


def rank_batches(data: torch.Tensor, rank: int) -> list[torch.Tensor]:
    return [batch for (batch,) in rank_loader(data, rank)]


def parameters_of(module: torch.nn.Module) -> dict:
    return {name: value.detach().clone() for name, value in module.named_parameters()}


# A GP too large for its exact evidence (here small), fitted by local masking: each step
# scores a minibatch of hidden points from their nearest context members; DistributedSampler
# splits the hidden points of a global batch of 32 across the ranks.
GP_POINTS, GP_TEST_POINTS, GP_CONTEXT, GP_BATCH, GP_EPOCHS, GP_LR = 160, 40, 8, 32, 6, 0.1


def gp_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    inputs = 4 * torch.rand(GP_POINTS + GP_TEST_POINTS, 1, generator=generator)
    targets = torch.sin(3 * inputs[:, 0]) + 0.2 * torch.randn(len(inputs), generator=generator)
    split = GP_POINTS
    return inputs[:split], targets[:split], inputs[split:], targets[split:]


class LocalGP(torch.nn.Module):
    """A Matérn-5/2 GP whose loss is minus the mean local masked score of hidden points."""

    def __init__(self):
        super().__init__()
        self.train_x, self.train_y, _, _ = gp_data()
        self.kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))
        self.raw_noise = torch.nn.Parameter(torch.tensor(0.0))
        self.objective = LocalMaskedObjective(self.train_x, GP_CONTEXT)

    def noise(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.raw_noise)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # Context sizes and contexts are drawn from torch's generator: the rank's stream.
        batch = self.objective.sample(hidden.shape[0], targets=hidden)
        scores = self.objective.log_predictive(
            self.kernel, self.train_x, self.train_y, self.noise(), batch
        )
        return -scores.mean()  # an unbiased estimate of -log p(y) / N

    def test_mlpd(self) -> float:
        _, _, test_x, test_y = gp_data()
        with torch.no_grad():
            predictive = local_predict(
                self.kernel,
                self.train_x,
                self.train_y,
                test_x,
                self.noise(),
                GP_CONTEXT,
                noiseless=False,
                index=self.objective.index,
            )
            normal = torch.distributions.Normal(predictive.mean, predictive.variance.sqrt())
            return float(normal.log_prob(test_y).mean())


class ExactGPModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class MaskedGPLoss(torch.nn.Module):
    """A user's ExactGP loss as the module DDP wraps: minus the masked marginal log likelihood
    per point, from ``batch_size`` hidden points per call and their local contexts."""

    def __init__(self, batch_size: int):
        super().__init__()
        train_x, train_y, _, _ = gp_data()
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood()
        self.model = ExactGPModel(train_x, train_y, self.likelihood)
        self.mll = MaskedMarginalLogLikelihood(
            self.likelihood, self.model, context_size=GP_CONTEXT, batch_size=batch_size
        )

    def forward(self) -> torch.Tensor:
        return -self.mll(self.model(*self.model.train_inputs), self.model.train_targets)

    def test_mlpd(self) -> float:
        _, _, test_x, test_y = gp_data()
        self.model.eval()
        try:
            with torch.no_grad():
                return float(self.likelihood(self.model(test_x)).log_prob(test_y)) / len(test_y)
        finally:
            self.model.train()


GP_STEPS = 12


def hidden_point_loaders(world_size: int, batch_size: int) -> list:
    """Each rank's sampler and loader of hidden points (shuffled every epoch, disjoint)."""
    dataset = TensorDataset(torch.arange(GP_POINTS))
    loaders = []
    for rank in range(world_size):
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=0)
        loaders.append((sampler, DataLoader(dataset, batch_size=batch_size, sampler=sampler)))
    return loaders


def gp_result(gp: LocalGP) -> dict:
    return {"parameters": parameters_of(gp), "mlpd": gp.test_mlpd()}


# --------------------------------------------------------------------------------------------
# What every rank runs
# --------------------------------------------------------------------------------------------


def train_ddp(name: str, rank: int, seed: int) -> dict:
    """Optimizer steps on this rank's minibatches, gradients averaged by DDP."""
    loss_fn, data = make_problem(name)
    ddp = DistributedDataParallel(loss_fn)
    optimizer = optimizer_for(name, ddp.parameters())
    randomness = RankRandomness(seed)  # the rank comes from torch.distributed
    for batch in rank_batches(data, rank):
        optimizer.zero_grad()
        with randomness:
            loss = ddp(batch)
        loss.backward()
        optimizer.step()
    return parameters_of(loss_fn)


def train_local_gp_ddp(rank: int, seed: int) -> dict:
    gp = LocalGP()
    ddp = DistributedDataParallel(gp)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=GP_LR)
    randomness = RankRandomness(seed)
    sampler, loader = hidden_point_loaders(WORLD_SIZE, GP_BATCH // WORLD_SIZE)[rank]
    for epoch in range(GP_EPOCHS):
        sampler.set_epoch(epoch)
        for (hidden,) in loader:
            optimizer.zero_grad()
            with randomness:
                loss = ddp(hidden)
            loss.backward()
            optimizer.step()
    return gp_result(gp)


def train_exact_gp_ddp(seed: int) -> dict:
    loss_fn = MaskedGPLoss(GP_BATCH // WORLD_SIZE)
    ddp = DistributedDataParallel(loss_fn)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=GP_LR)
    randomness = RankRandomness(seed)
    for _ in range(GP_STEPS):
        optimizer.zero_grad()
        with randomness:
            loss = ddp()
        loss.backward()
        optimizer.step()
    return {"parameters": parameters_of(loss_fn), "mlpd": loss_fn.test_mlpd()}


def local_evidence_on_rank(rank: int, seed: int):
    train_x, train_y, _, _ = gp_data()
    kernel = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))
    with RankRandomness(seed, rank=rank):
        return estimate_local_log_marginal(
            kernel, train_x, train_y, 0.05, GP_CONTEXT, num_batches=4, batch_size=16
        )


def train_lightning(rank: int, seed: int) -> dict:
    import lightning
    from lightning.pytorch.strategies import DDPStrategy

    from pyro_masked.distributed import MaskedLightningModule

    loss_fn, data = make_problem("ppca")
    plan = MaskedLightningModule(loss_fn, lr=STEPS_LR, seed=seed)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy=DDPStrategy(process_group_backend="gloo", timeout=COLLECTIVE_TIMEOUT),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        # Our DistributedSampler, without shuffling, so that the test process knows the batches.
        use_distributed_sampler=False,
    )
    trainer.fit(plan, train_dataloaders=rank_loader(data, rank))
    return parameters_of(loss_fn)


def shard_of(data: torch.Tensor, rank: int) -> torch.Tensor:
    return data.chunk(WORLD_SIZE)[rank]


def evidence_model(data: torch.Tensor) -> None:
    """PPCA with fixed parameters, every data point of ``data`` scored (no subsampling)."""
    loadings = torch.tensor([[1.2], [-0.8], [0.4], [1.7]])
    with pyro.plate("data", data.shape[0]):
        fn = dist.LowRankMultivariateNormal(
            torch.full((DIM,), 0.3), loadings, 0.3 * torch.ones(DIM)
        )
        pyro.sample("obs", fn, obs=data)


def draw_options(draws) -> dict:
    """``draws`` independent draws, or ``"all"``: every mask enumerated (nothing random)."""
    return {"num_masks": "all"} if draws == "all" else {"num_draws": draws}


def evidence_on_rank(rank: int, seed: int, draws) -> object:
    # Drawn from the rank's stream of torch's global generator.
    with RankRandomness(seed, rank=rank):
        return estimate_log_marginal(
            evidence_model, model_args=(shard_of(ppca_data(), rank),), **draw_options(draws)
        )


def curve_on_rank(rank: int, draws) -> object:
    # Drawn from a private generator seeded with the rank's seed.
    return mask_rate_curve(
        evidence_model,
        model_args=(shard_of(ppca_data(), rank),),
        seed=rank_seed(SEED, rank),
        **draw_options(draws),
    )


def masked_scores_of_shared_data(seed: int, rank: int) -> torch.Tensor:
    """The masked scores of the same data on every rank: equal iff the masks are equal."""
    fn = dist.MultivariateNormal(torch.zeros(DIM), 0.5 * torch.eye(DIM) + 0.5)
    with RankRandomness(seed, rank=rank):
        return masked_log_prob(fn, ppca_data()[:6], num_masks=1)


def _rank_main(rank: int, world_size: int, out_dir: str) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    pyro.settings.set(module_local_params=True)
    # Lightning then joins this process group instead of starting processes of its own.
    os.environ.update(WORLD_SIZE=str(world_size), NODE_RANK="0", LOCAL_RANK=str(rank))
    torch_dist.init_process_group(
        "gloo",
        # A file for the rendezvous: no port to pick that another program could take first.
        init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        results = {
            "rank": torch_dist.get_rank(),
            "seed": rank_seed(SEED),
            "scores": masked_scores_of_shared_data(SEED, rank),
            "ppca_all": train_ddp("ppca_all", rank, SEED),
            "ppca": train_ddp("ppca", rank, SEED),
            "latent": train_ddp("latent", rank, SEED),
        }
        results["local_gp"] = train_local_gp_ddp(rank, SEED)
        results["exact_gp"] = train_exact_gp_ddp(SEED)
        local_evidence = local_evidence_on_rank(rank, SEED)
        results["local_evidence"] = reduce_log_marginal(local_evidence, reduction="mean")
        evidence = evidence_on_rank(rank, SEED, draws=4)
        exact_evidence = evidence_on_rank(rank, SEED, draws="all")
        results["evidence_local"] = evidence
        results["evidence_sum"] = reduce_log_marginal(evidence)
        results["evidence_mean"] = reduce_log_marginal(evidence, reduction="mean")
        results["evidence_pair"] = reduce_log_marginal((evidence.estimate, evidence.stderr))
        results["evidence_all"] = reduce_log_marginal(exact_evidence)
        results["curve_all"] = reduce_log_marginal(curve_on_rank(rank, draws="all"))
        results["curve"] = reduce_log_marginal(curve_on_rank(rank, draws=3))
        try:
            # Rank 1 gives a different number of draws: every rank must raise, none hang.
            reduce_log_marginal(evidence_on_rank(rank, SEED, draws=2 + rank))
        except ValueError as error:
            results["mismatch_error"] = str(error)
        try:
            # Rank 1's estimate is not finite: rank 0 must raise too, not wait for it.
            reduce_log_marginal((1.0, 0.1) if rank == 0 else (math.nan, 0.1))
        except ValueError as error:
            results["bad_rank_error"] = str(error)
        results["lightning"] = train_lightning(rank, SEED)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = str(tmp_path_factory.mktemp("ranks"))
    context = mp.start_processes(
        _rank_main,
        args=(WORLD_SIZE, out_dir),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        while not context.join(timeout=1.0):  # raises with a rank's traceback if it failed
            if time.monotonic() > deadline:
                pytest.fail(f"the {WORLD_SIZE} ranks did not finish in {DEADLINE_SECONDS} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.fixture
def module_local_params():
    previous = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=True)
    yield
    pyro.settings.set(module_local_params=previous)


# --------------------------------------------------------------------------------------------
# One process over the same minibatches and masks
# --------------------------------------------------------------------------------------------


def train_one_process(name: str, streams: list) -> dict:
    """The global batch of each step is rank 0's part and rank 1's part; part ``r`` is scored
    under ``streams[r]``, and the loss is the mean of the parts' losses: the loss of the global
    batch, ``(N / B) * sum over B + global terms``, written as a mean over the parts."""
    loss_fn, data = make_problem(name)
    optimizer = optimizer_for(name, loss_fn.parameters())
    for parts in zip(*(rank_batches(data, rank) for rank in range(WORLD_SIZE))):
        optimizer.zero_grad()
        losses = []
        for part, stream in zip(parts, streams):
            with stream:
                losses.append(loss_fn(part))
        torch.stack(losses).mean().backward()
        optimizer.step()
    return parameters_of(loss_fn)


def train_one_process_global_batch(name: str, loss_scale: float = 1.0) -> dict:
    """One process, one loss over each global batch (its plate subsample is all 16 points)."""
    loss_fn, data = make_problem(name)
    optimizer = optimizer_for(name, loss_fn.parameters())
    for parts in zip(*(rank_batches(data, rank) for rank in range(WORLD_SIZE))):
        optimizer.zero_grad()
        (loss_scale * loss_fn(torch.cat(parts))).backward()
        optimizer.step()
    return parameters_of(loss_fn)


def train_local_gp_one_process(world_size: int, seed: int) -> dict:
    """Each global batch of hidden points in ``world_size`` parts, part ``r`` under stream
    ``r``, the loss the mean of the parts' losses (one part: the whole global batch)."""
    gp = LocalGP()
    optimizer = torch.optim.Adam(gp.parameters(), lr=GP_LR)
    streams = rank_streams(seed, world_size)
    loaders = hidden_point_loaders(world_size, GP_BATCH // world_size)
    for epoch in range(GP_EPOCHS):
        for sampler, _ in loaders:
            sampler.set_epoch(epoch)
        for parts in zip(*(loader for _, loader in loaders)):
            optimizer.zero_grad()
            losses = []
            for (hidden,), stream in zip(parts, streams):
                with stream:
                    losses.append(gp(hidden))
            torch.stack(losses).mean().backward()
            optimizer.step()
    return gp_result(gp)


def train_exact_gp_one_process(world_size: int, seed: int) -> dict:
    """Each step's loss the mean over ``world_size`` parts of ``GP_BATCH / world_size`` hidden
    points, part ``r`` drawn under stream ``r``."""
    loss_fn = MaskedGPLoss(GP_BATCH // world_size)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=GP_LR)
    streams = rank_streams(seed, world_size)
    for _ in range(GP_STEPS):
        optimizer.zero_grad()
        losses = []
        for stream in streams:
            with stream:
                losses.append(loss_fn())
        torch.stack(losses).mean().backward()
        optimizer.step()
    return {"parameters": parameters_of(loss_fn), "mlpd": loss_fn.test_mlpd()}


def rank_streams(seed: int, world_size: int = WORLD_SIZE) -> list:
    return [RankRandomness(seed, rank=rank) for rank in range(world_size)]


def assert_parameters_close(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-9, atol=1e-10)


def parameters_differ(first: dict, second: dict) -> bool:
    return any(not torch.allclose(first[name], second[name]) for name in first)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_ranks_ran_with_their_own_rank(ranks):
    assert [result["rank"] for result in ranks] == list(range(WORLD_SIZE))
    assert [result["seed"] for result in ranks] == [rank_seed(SEED, r) for r in range(WORLD_SIZE)]


def test_ddp_equals_one_process_over_the_global_batch_with_every_mask(ranks, module_local_params):
    # num_masks="all" leaves nothing random: DDP's averaged gradient is the gradient of the
    # one-process loss over the whole global batch, with no loss scale (SGD steps show one).
    expected = train_one_process_global_batch("ppca_all")
    initial = parameters_of(make_problem("ppca_all")[0])
    assert parameters_differ(expected, initial)
    # Negative control: data terms scaled by N / B instead of N / b, i.e. W times too small
    # (this model has no global terms), end elsewhere.
    assert parameters_differ(train_one_process_global_batch("ppca_all", loss_scale=0.5), expected)
    for result in ranks:
        assert_parameters_close(result["ppca_all"], expected)


@pytest.mark.parametrize("name", ["ppca", "latent"])
def test_ddp_equals_one_process_over_the_same_minibatches_and_masks(
    ranks, module_local_params, name
):
    expected = train_one_process(name, rank_streams(SEED))
    for result in ranks:
        assert_parameters_close(result[name], expected)
    # Negative control: with rank 0's masks on both parts (one seed on every rank) the
    # parameters differ, so the comparison sees which masks each rank drew.
    same_masks = train_one_process(name, [RankRandomness(SEED, rank=0)] * WORLD_SIZE)
    assert parameters_differ(same_masks, expected)


def test_local_gp_ddp_equals_one_process_over_the_same_hidden_points_and_contexts(ranks):
    expected = train_local_gp_one_process(WORLD_SIZE, SEED)
    for result in ranks:
        assert_parameters_close(result["local_gp"]["parameters"], expected["parameters"])
        assert result["local_gp"]["mlpd"] == pytest.approx(expected["mlpd"], rel=1e-9)


def test_local_gp_ddp_reaches_the_test_mlpd_of_one_process_over_global_batches(ranks):
    # One process, whole global batches from one stream: other minibatches and contexts, so
    # the fits differ by optimisation noise only (over seeds the test MLPD of either run
    # spreads by about 0.004 nats per point); an unfitted GP is 0.9 nats per point worse.
    one_process = train_local_gp_one_process(1, SEED)
    unfitted = LocalGP().test_mlpd()
    for result in ranks:
        assert abs(result["local_gp"]["mlpd"] - one_process["mlpd"]) < 0.02
        assert result["local_gp"]["mlpd"] > unfitted + 0.5


def test_exact_gp_loop_with_context_size_under_ddp_equals_one_process(ranks):
    # MaskedMarginalLogLikelihood(context_size=...) in a user's ExactGP loop, wrapped by DDP:
    # each rank scores its own 16 hidden points per step.
    expected = train_exact_gp_one_process(WORLD_SIZE, SEED)
    one_process = train_exact_gp_one_process(1, SEED)  # 32 hidden points, one stream
    unfitted = MaskedGPLoss(GP_BATCH).test_mlpd()
    for result in ranks:
        assert_parameters_close(result["exact_gp"]["parameters"], expected["parameters"])
        assert result["exact_gp"]["mlpd"] == pytest.approx(expected["mlpd"], rel=1e-9)
        assert abs(result["exact_gp"]["mlpd"] - one_process["mlpd"]) < 0.05
        assert result["exact_gp"]["mlpd"] > unfitted + 0.2


def test_reduced_local_gp_evidence_pools_the_ranks_minibatches(ranks):
    local = [local_evidence_on_rank(rank, SEED) for rank in range(WORLD_SIZE)]
    assert local[0].estimate != local[1].estimate  # independent minibatches on the ranks
    for result in ranks:
        reduced = result["local_evidence"]
        estimate = (local[0].estimate + local[1].estimate) / WORLD_SIZE
        stderr = math.hypot(local[0].stderr, local[1].stderr) / WORLD_SIZE
        assert reduced.estimate == pytest.approx(estimate, rel=1e-12)
        assert reduced.stderr == pytest.approx(stderr, rel=1e-12)
        assert reduced.num_points == GP_POINTS


def test_lightning_ddp_equals_one_process_over_the_same_minibatches_and_masks(
    ranks, module_local_params
):
    expected = train_one_process("ppca", rank_streams(SEED))
    for result in ranks:
        assert_parameters_close(result["lightning"], expected)


def test_masks_differ_across_ranks_and_are_reproducible(ranks):
    scores = [result["scores"] for result in ranks]
    # The same data on every rank: the scores differ only if the masks do.
    assert not torch.allclose(scores[0], scores[1])
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["scores"], masked_scores_of_shared_data(SEED, rank))


def test_reduced_evidence_equals_one_process_over_the_union(ranks):
    data = ppca_data()
    # Every mask enumerated: nothing is random, and the shards' sum is the union's estimate.
    union = estimate_log_marginal(evidence_model, model_args=(data,), num_masks="all")
    for result in ranks:
        reduced = result["evidence_all"]
        assert reduced.estimate == pytest.approx(union.estimate, rel=1e-12)
        assert reduced.exact == pytest.approx(union.exact, rel=1e-12)
        assert reduced.unmasked == pytest.approx(union.unmasked, rel=1e-12)
        assert reduced.stderr == 0.0


def test_reduced_mask_rate_curve_equals_one_process_over_the_union(ranks):
    union = mask_rate_curve(evidence_model, model_args=(ppca_data(),), num_masks="all")
    for result in ranks:
        reduced = result["curve_all"]
        torch.testing.assert_close(reduced.rates, union.rates)
        torch.testing.assert_close(reduced.scores, union.scores, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reduced.estimates, union.estimates, rtol=1e-12, atol=1e-12)
        assert reduced.area == pytest.approx(union.area, rel=1e-12)
        assert reduced.exact == pytest.approx(union.exact, rel=1e-12)
        assert reduced.area_stderr == 0.0


def test_reduced_mask_rate_curve_adds_variances_rate_by_rate(ranks):
    local = [curve_on_rank(rank, draws=3) for rank in range(WORLD_SIZE)]
    for result in ranks:
        reduced = result["curve"]
        torch.testing.assert_close(reduced.scores, local[0].scores + local[1].scores)
        expected = (local[0].estimate_stderrs ** 2 + local[1].estimate_stderrs ** 2).sqrt()
        torch.testing.assert_close(reduced.estimate_stderrs, expected)
        assert reduced.area_stderr == pytest.approx(
            math.hypot(local[0].area_stderr, local[1].area_stderr), rel=1e-12
        )


def test_reduced_evidence_sums_estimates_and_adds_variances(ranks):
    local = [evidence_on_rank(rank, SEED, draws=4) for rank in range(WORLD_SIZE)]
    estimate = sum(part.estimate for part in local)
    stderr = math.sqrt(sum(part.stderr**2 for part in local))
    assert all(part.stderr > 0 for part in local)
    for rank, result in enumerate(ranks):
        assert result["evidence_local"].estimate == pytest.approx(local[rank].estimate, rel=1e-12)
        reduced = result["evidence_sum"]
        assert reduced.estimate == pytest.approx(estimate, rel=1e-12)
        assert reduced.stderr == pytest.approx(stderr, rel=1e-12)
        torch.testing.assert_close(reduced.draws, local[0].draws + local[1].draws)
        assert reduced.exact == pytest.approx(sum(part.exact for part in local), rel=1e-12)
        assert result["evidence_pair"] == pytest.approx((estimate, stderr), rel=1e-12)
        mean = result["evidence_mean"]
        assert mean.estimate == pytest.approx(estimate / WORLD_SIZE, rel=1e-12)
        assert mean.stderr == pytest.approx(stderr / WORLD_SIZE, rel=1e-12)
        # The union's evidence, within a few standard errors.
        assert abs(reduced.estimate - reduced.exact) < 4 * reduced.stderr


def test_reduce_rejects_ranks_with_different_draws_on_every_rank(ranks):
    for result in ranks:
        assert "differ" in result["mismatch_error"]


# --------------------------------------------------------------------------------------------
# One process: the helpers on their own
# --------------------------------------------------------------------------------------------


def test_rank_seed_is_reproducible_and_differs_by_rank_and_seed():
    seeds = {rank_seed(seed, rank) for seed in range(3) for rank in range(4)}
    assert len(seeds) == 12
    assert rank_seed(5, 1) == rank_seed(5, 1)
    assert rank_seed(5) == rank_seed(5, 0)  # no process group: rank 0
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_rank_randomness_continues_its_stream_and_restores_the_global_one():
    randomness = RankRandomness(7, rank=1)
    torch.manual_seed(0)
    expected_global = torch.rand(4)
    torch.manual_seed(0)
    with randomness:
        first = torch.rand(3)
    global_draw = torch.rand(4)
    with randomness:
        second = torch.rand(3)
    torch.testing.assert_close(global_draw, expected_global)
    stream = torch.Generator().manual_seed(rank_seed(7, 1))
    torch.testing.assert_close(torch.cat([first, second]), torch.rand(6, generator=stream))


def test_rank_generator_gives_each_rank_its_own_masks_without_the_global_generator():
    fn = dist.MultivariateNormal(torch.zeros(DIM), 0.5 * torch.eye(DIM) + 0.5)
    data = ppca_data()[:6]
    state = torch.get_rng_state()
    scores = [masked_log_prob(fn, data, generator=rank_generator(SEED, rank)) for rank in (0, 1, 0)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(scores[0], scores[2])
    assert not torch.allclose(scores[0], scores[1])
    # The same stream as RankRandomness's.
    torch.testing.assert_close(scores[1], masked_scores_of_shared_data(SEED, 1))


def test_rank_randomness_as_decorator_restores_state_after_an_error():
    randomness = RankRandomness(3, rank=0)

    @randomness
    def failing_draw():
        torch.rand(2)
        raise KeyError("inside")

    state = torch.get_rng_state()
    with pytest.raises(KeyError):
        failing_draw()
    assert torch.equal(torch.get_rng_state(), state)
    with randomness:  # usable again after the error
        pass


def test_rank_randomness_rejects_reentry_and_bad_arguments():
    randomness = RankRandomness(0, rank=0)
    with randomness:
        with pytest.raises(RuntimeError, match="already active"):
            randomness.__enter__()
    with pytest.raises(TypeError, match="seed"):
        RankRandomness(1.5)
    with pytest.raises(ValueError, match="seed"):
        RankRandomness(-1)
    with pytest.raises(TypeError, match="rank"):
        RankRandomness(0, rank="0")
    with pytest.raises(ValueError, match="device"):
        RankRandomness(0, device="meta")


def test_reduce_log_marginal_needs_a_process_group_and_a_known_reduction():
    with pytest.raises(ValueError, match="reduction"):
        reduce_log_marginal((1.0, 0.1), reduction="max")
    with pytest.raises(RuntimeError, match="init_process_group"):
        reduce_log_marginal((1.0, 0.1))


@pytest.fixture
def single_rank_group(tmp_path):
    torch_dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=COLLECTIVE_TIMEOUT,
    )
    yield
    torch_dist.destroy_process_group()


def test_reduce_log_marginal_on_one_rank_returns_its_input(single_rank_group):
    result = estimate_log_marginal(evidence_model, model_args=(ppca_data(),), num_draws=3)
    reduced = reduce_log_marginal(result)
    assert type(reduced) is type(result)
    assert reduced.estimate == pytest.approx(result.estimate, rel=1e-15)
    assert reduced.stderr == pytest.approx(result.stderr, rel=1e-15)
    torch.testing.assert_close(reduced.draws, result.draws)
    assert reduce_log_marginal((torch.tensor(2.0), 0.5)) == (2.0, 0.5)


def test_reduce_log_marginal_rejects_bad_results(single_rank_group):
    with pytest.raises(TypeError, match="pair, a LogMarginalEstimate"):
        reduce_log_marginal(3.0)
    with pytest.raises(TypeError, match="stderr"):
        reduce_log_marginal((3.0, "big"))
    with pytest.raises(ValueError, match="finite"):
        reduce_log_marginal((math.nan, 0.1))
    with pytest.raises(ValueError, match="stderr must be >= 0"):
        reduce_log_marginal((1.0, -0.1))


def test_lightning_module_without_lightning_names_the_extra(monkeypatch):
    from pyro_masked import distributed

    monkeypatch.setattr(distributed, "_lazy", {})
    monkeypatch.setitem(sys.modules, "lightning", None)  # import lightning raises ImportError
    with pytest.raises(ImportError, match=r"pip install pyro_masked\[distributed\]"):
        distributed.MaskedLightningModule  # noqa: B018
    with pytest.raises(AttributeError, match="no_such_name"):
        distributed.no_such_name  # noqa: B018


def test_reduce_raises_on_every_rank_when_one_rank_has_a_bad_result(ranks):
    assert "must be finite" in ranks[1]["bad_rank_error"]
    assert "rank 1" in ranks[0]["bad_rank_error"]
    assert "must be finite" in ranks[0]["bad_rank_error"]


@requires_cuda
def test_rank_randomness_draws_cuda_masks_from_its_own_stream():
    fn = dist.MultivariateNormal(
        torch.zeros(DIM, device="cuda"), (0.5 * torch.eye(DIM) + 0.5).cuda()
    )
    data = ppca_data()[:6].cuda()

    def scores(rank):
        with RankRandomness(SEED, rank=rank, device="cuda"):
            return masked_log_prob(fn, data, num_masks=1)

    state = torch.cuda.get_rng_state()
    first, again, other = scores(0), scores(0), scores(1)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)
    assert first.device.type == "cuda"


# Lightning 2.6 calls torch's pytree API in a way torch 2.13 deprecates.
@pytest.mark.filterwarnings(
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning"
)
def test_lightning_module_trains_on_tensor_batches_with_rank_zero_masks(module_local_params):
    import lightning

    from pyro_masked.distributed import MaskedLightningModule

    loss_fn, data = make_problem("ppca")
    plan = MaskedLightningModule(loss_fn, lr=STEPS_LR, seed=SEED)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(plan, train_dataloaders=DataLoader(data, batch_size=LOCAL_BATCH))
    expected_fn, _ = make_problem("ppca")
    optimizer = torch.optim.Adam(expected_fn.parameters(), lr=STEPS_LR)
    stream = RankRandomness(SEED, rank=0)
    for batch in data.split(LOCAL_BATCH):
        optimizer.zero_grad()
        with stream:
            loss = expected_fn(batch)
        loss.backward()
        optimizer.step()
    assert_parameters_close(parameters_of(loss_fn), parameters_of(expected_fn))

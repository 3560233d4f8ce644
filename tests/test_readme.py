"""The README's example code, run as written, reaches what the README says it does."""

import json
import math
import os
import pathlib
import re

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

README = pathlib.Path(__file__).parent.parent / "README.md"
TUTORIALS = sorted((README.parent / "tutorials").glob("*.ipynb"))
#: Gap to the maximum of the log likelihood, in nats per data point, that a fit by cumulative
#: masking stays within; fits of a fixed rate or of leave-one-out stop further away.
TOLERANCE = 0.02


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(block for block in blocks if "loss=MaskedELBO()" in block)


def run(example: str) -> dict:
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    return namespace


def tipping_bishop_maximum(x: torch.Tensor, rank: int) -> float:
    """The maximum over W and s of the log likelihood of x_n ~ N(0, W W^T + s I).

    Tipping & Bishop (1999): with eigenvalues l_1 >= ... >= l_D of the second-moment matrix
    S = X^T X / N (the model's mean is fixed at zero), s = mean(l_{q+1..D}) and
    log L = -N/2 (D log 2 pi + sum_{i<=q} log l_i + (D - q) log s + D).
    """
    num_data, size = x.shape
    eigenvalues = torch.linalg.eigvalsh(x.T @ x / num_data).flip(0)
    noise = eigenvalues[rank:].mean()
    return (
        -0.5
        * num_data
        * (
            size * math.log(2 * math.pi)
            + eigenvalues[:rank].log().sum().item()
            + (size - rank) * noise.log().item()
            + size
        )
    )


def gap_per_point(namespace: dict) -> float:
    """Maximum log likelihood minus the fitted one, per data point (>= 0)."""
    x = namespace["x"]
    weight = namespace["pyro"].param("W").detach()
    noise = namespace["pyro"].param("s").detach()
    covariance = weight @ weight.T + noise * torch.eye(x.shape[1])
    fitted = dist.MultivariateNormal(torch.zeros(x.shape[1]), covariance).log_prob(x).sum()
    return (tipping_bishop_maximum(x, weight.shape[1]) - fitted.item()) / x.shape[0]


def test_the_readme_example_reaches_the_maximum_by_a_random_unbiased_estimate():
    namespace = run(readme_example())
    gap = gap_per_point(namespace)
    assert -1e-9 < gap < TOLERANCE
    # An objective that skipped masking (Trace_ELBO under another name) would also reach the
    # maximum; it would not give random draws around the exact negative log likelihood.
    svi, model, x = namespace["svi"], namespace["model"], namespace["x"]
    exact = Trace_ELBO().loss(model, lambda x: None, x)
    draws = torch.tensor([svi.evaluate_loss(x) for _ in range(64)])
    standard_error = draws.std().item() / math.sqrt(len(draws))
    assert draws.std() > 1e-3 * abs(exact)
    assert abs(draws.mean().item() - exact) < 4 * standard_error


@pytest.mark.parametrize("loss", ["MaskedELBO(mask=0.15)", "MaskedELBO(mask=1)"])
def test_the_readme_example_with_a_fixed_mask_size_stops_short_of_the_maximum(loss):
    # Negative control: BERT's rate and leave-one-out optimise biased objectives, so the same
    # tolerance must reject them.
    example = readme_example().replace("loss=MaskedELBO()", f"loss={loss}")
    assert gap_per_point(run(example)) > TOLERANCE


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda path: path.name)
def test_the_readme_test_command_runs_each_notebook_short_on_one_thread(notebook, monkeypatch):
    # `pytest` as the README writes it executes the notebooks: by default in their short mode
    # (no CI variable needed), in full only when PYRO_MASKED_FULL=1 asks for it.
    cells = json.loads(notebook.read_text())["cells"]
    sources = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    header = next(source for source in sources if "full_run =" in source)
    switch = next(line for line in header.splitlines() if line.startswith("full_run ="))
    for environment, full_run in (
        ({}, False),
        ({"CI": "true"}, False),
        ({"PYRO_MASKED_FULL": "1"}, True),
    ):
        for name in ("CI", "PYRO_MASKED_FULL"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environment.items():
            monkeypatch.setenv(name, value)
        namespace = {"os": os}
        exec(switch, namespace)
        assert namespace["full_run"] is full_run, environment
    assert "torch.set_num_threads(1)" in header  # the threading advice of tutorials/README.md

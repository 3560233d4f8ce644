import pathlib
import re

import pyro
from pyro.infer import Trace_ELBO

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_the_readme_swap_example_runs_and_trains():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(block for block in blocks if "loss=MaskedELBO()" in block)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    model, x = namespace["model"], namespace["x"]

    def empty_guide(x):
        pass

    trained = Trace_ELBO().loss(model, empty_guide, x)  # the exact negative log likelihood
    pyro.clear_param_store()
    untrained = Trace_ELBO().loss(model, empty_guide, x)
    assert trained < untrained - 0.1 * abs(untrained)

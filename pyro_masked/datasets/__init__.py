"""Small real datasets used by the examples, shipped inside the package (no download).

Sources and licences are listed in ``pyro_masked/datasets/README.md``.
"""

from __future__ import annotations

import csv
from importlib import resources
from typing import NamedTuple, Optional

import torch

__all__ = ["MaunaLoaCO2", "load_mauna_loa_co2"]

_CO2_FILE = "mauna_loa_co2_monthly.csv"


class MaunaLoaCO2(NamedTuple):
    """The Mauna Loa CO2 record: ``year`` (decimal, mid-month) and ``co2`` (ppm), shape ``(N,)``."""

    year: torch.Tensor
    co2: torch.Tensor


def load_mauna_loa_co2(dtype: Optional[torch.dtype] = None) -> MaunaLoaCO2:
    """Monthly mean atmospheric CO2 at Mauna Loa, Hawaii, March 1958 to December 2001.

    521 months (months without any weekly measurement are absent). The values are the means
    of the weekly record *Atmospheric CO2 from Continuous Air Samples at Mauna Loa
    Observatory* (C. D. Keeling and T. P. Whorf, Scripps Institution of Oceanography; Carbon
    Dioxide Information Analysis Center, U.S. Department of Energy), as distributed with
    statsmodels (``statsmodels.datasets.co2``). Public domain.

    :param dtype: the floating dtype of the tensors (default: torch's default dtype).
    :returns: a :class:`MaunaLoaCO2` of ``year`` (decimal year at mid-month, e.g. 1958.208)
        and ``co2`` (ppm), sorted by time.

    Reference: C. E. Rasmussen, C. K. I. Williams, "Gaussian Processes for Machine Learning",
    MIT Press 2006, section 5.4.3, model this record with a composite kernel.
    """
    dtype = dtype or torch.get_default_dtype()
    text = resources.files(__name__).joinpath(_CO2_FILE).read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    year = torch.tensor([float(row["decimal_year"]) for row in rows], dtype=dtype)
    co2 = torch.tensor([float(row["co2_ppm"]) for row in rows], dtype=dtype)
    return MaunaLoaCO2(year=year, co2=co2)

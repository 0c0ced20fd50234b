"""The registry of calibrated solvers: a method name → the class that solves a layer from its statistics.

A new calibrated method joins with one line here and one file of its own; the block-by-block runner
(:mod:`.calibrated`) is the same for all of them.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from wct.formats.integer import IntegerFormat
from wct.nn import QuantLinear

from .blockwise import BlockStep
from .config import QuantConfig
from .gptq import GPTQ, GPTQSolver
from .gwq import GWQSolver
from .owq import OWQSolver


class Solver(Protocol):
    """What the calibrated runner asks of a method (see :class:`.gptq.GPTQSolver` for the reference behaviour)."""

    def __init__(self, config: QuantConfig, fmt: IntegerFormat) -> None: ...

    def memory(self, model: nn.Module, calibration: torch.Tensor) -> tuple[int, str]: ...

    def prepare(self, model: nn.Module, calibration: torch.Tensor, progress: bool) -> None: ...

    def plan_block(self, step: BlockStep, layers: dict[str, nn.Module]) -> None: ...

    def solve(self, name: str, linear: nn.Module, hessian: GPTQ) -> tuple[QuantLinear, dict]: ...


SOLVERS: dict[str, type[Solver]] = {
    "gptq": GPTQSolver,
    "owq": OWQSolver,
    "gwq": GWQSolver,
}


def get_solver(config: QuantConfig, fmt: IntegerFormat) -> Solver:
    try:
        return SOLVERS[config.method](config, fmt)
    except KeyError:
        raise ValueError(f"{config.method!r} is not a calibrated method; calibrated: {sorted(SOLVERS)}") from None

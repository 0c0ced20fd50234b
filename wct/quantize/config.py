"""``QuantConfig``: one dataclass says how a whole model is quantized."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from wct.formats import Format, get_format

CODEBOOK_METHODS = ("nf4", "af4", "bof4", "bof4s")
INTEGER_METHODS = ("rtn", "gptq", "owq", "gwq")
CALIBRATED_METHODS = ("gptq", "owq", "gwq")
METHODS = INTEGER_METHODS + CODEBOOK_METHODS


@dataclass
class QuantConfig:
    """How to quantize a model.

    ``method``: ``rtn`` (round to nearest, integer), ``gptq``, ``owq``, ``gwq``
    (calibrated, integer), or a codebook format ``nf4``/``af4``/``bof4``/``bof4s``
    (round to nearest in the codebook; with ``opq=True`` magnitude outliers stay in 16-bit).
    """

    method: str = "bof4s"
    wbits: int = 4
    group_size: int | None = None
    sym: bool = False
    block_size: int = 64
    double_quant: bool = False
    # outliers
    target_bits: float | None = None  # OWQ: average bits incl. 16-bit weak columns; None = wbits + 0.01 (warned)
    outlier_ratio: float = 0.01  # GWQ: fraction of weights kept in 16-bit
    opq: bool = False
    opq_quantile: float = 0.95
    outlier_dtype: str = "float16"
    # GPTQ
    percdamp: float = 0.01
    blocksize: int = 128
    # GPTQ's activation order (columns by descending Hessian diagonal; OWQ's weak columns stay last).  On by
    # default because it is the largest single quality lever we measured (docs/benchmarks/quality.md, the *-noact
    # rows); with groups it uses static groups, so storage is unchanged.
    act_order: bool = True
    true_sequential: bool = False
    range_search: str | None = None  # "minmax" | "mse" (GPTQ shrink) | "grid" (OWQ width x zero point); None = method default
    # scope
    include_lm_head: bool = False
    skip_modules: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.method in INTEGER_METHODS and self.wbits not in (2, 3, 4, 8):
            raise ValueError(f"wbits={self.wbits} is not supported; choose 2, 3, 4 or 8")
        if self.method in CODEBOOK_METHODS and self.wbits != 4:
            raise ValueError(f"{self.method} is a 4-bit codebook, wbits={self.wbits} does not apply; leave wbits at 4, "
                             f"or use an integer method (rtn, gptq, owq, gwq) for {self.wbits}-bit codes")
        if not 0 <= self.outlier_ratio < 1:
            raise ValueError(f"outlier_ratio must be in [0, 1), got {self.outlier_ratio}")
        if not 0 < self.opq_quantile < 1:
            raise ValueError(f"opq_quantile must be in (0, 1), got {self.opq_quantile}")
        self._check_target_bits()
        if self.range_search not in (None, "minmax", "mse", "grid"):
            raise ValueError(f"range_search must be 'minmax', 'mse' or 'grid' (or None for the method default), got "
                             f"{self.range_search!r}")
        self.skip_modules = tuple(self.skip_modules)
        self.format()  # validate format parameters early

    def _check_target_bits(self) -> None:
        """``target_bits`` is OWQ's budget; elsewhere it would be ignored, and at or below wbits it buys nothing."""
        if self.method != "owq":
            if self.target_bits is not None:
                kind = "the codebook format" if self.method in CODEBOOK_METHODS else "method"
                raise ValueError(f"target_bits applies only to method='owq' (16-bit weak columns on a wbits grid), not "
                                 f"to {kind} {self.method!r}; drop target_bits, or use method='owq', wbits=3, "
                                 f"target_bits=3.01")
            return
        if self.target_bits is None:
            # the OWQ paper's 3.01 / 4.01 convention; without a budget OWQ would keep no weak column and WCT would
            # have nothing to train
            self.target_bits = self.wbits + 0.01
            warnings.warn(f"QuantConfig(method='owq'): target_bits not given, using {self.target_bits:g} "
                          f"(wbits + 0.01); pass target_bits to choose the 16-bit weak-column budget", stacklevel=3)
        elif self.target_bits <= self.wbits:
            raise ValueError(f"target_bits={self.target_bits} must be above wbits={self.wbits} for method='owq' "
                             f"(the difference buys the 16-bit weak columns), e.g. target_bits={self.wbits + 0.01:g}")

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_METHODS

    def format(self, partial_groups: bool = True) -> Format:
        """The storage format of the packed base."""
        if self.method in CODEBOOK_METHODS:
            return get_format(self.method, block_size=self.block_size, double_quant=self.double_quant)
        return get_format(f"int{self.wbits}", group_size=self.group_size, sym=self.sym, partial_groups=partial_groups)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        return d

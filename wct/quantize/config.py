"""``QuantConfig``: one dataclass says how a whole model is quantized."""

from __future__ import annotations

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
    target_bits: float | None = None  # OWQ: average bits incl. 16-bit weak columns
    outlier_ratio: float = 0.01  # GWQ: fraction of weights kept in 16-bit
    opq: bool = False
    opq_quantile: float = 0.95
    outlier_dtype: str = "float16"
    # GPTQ
    percdamp: float = 0.01
    blocksize: int = 128
    # GPTQ's activation order (columns by descending Hessian diagonal; OWQ's weak columns stay last).  On by
    # default: on SmolLM2-135M it took 3-bit GPTQ from 111 to 73 ppl and OWQ 3.01 from 42.5 to 36.0
    # (docs/benchmarks/quality.md, rows *-noact); with groups it uses static groups, so storage is unchanged.
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
        if not 0 <= self.outlier_ratio < 1:
            raise ValueError(f"outlier_ratio must be in [0, 1), got {self.outlier_ratio}")
        if not 0 < self.opq_quantile < 1:
            raise ValueError(f"opq_quantile must be in (0, 1), got {self.opq_quantile}")
        if self.target_bits is not None and self.target_bits < self.wbits:
            raise ValueError(f"target_bits={self.target_bits} is below wbits={self.wbits}")
        if self.range_search not in (None, "minmax", "mse", "grid"):
            raise ValueError(f"range_search must be 'minmax', 'mse' or 'grid' (or None for the method default), got "
                             f"{self.range_search!r}")
        self.skip_modules = tuple(self.skip_modules)
        self.format()  # validate format parameters early

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

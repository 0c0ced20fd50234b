"""``QuantConfig``: one dataclass says how a whole model is quantized."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from wct.formats import Format, get_format

CODEBOOK_METHODS = ("nf4", "af4", "bof4", "bof4s")
INTEGER_METHODS = ("rtn", "gptq", "owq", "gwq")
CALIBRATED_METHODS = ("gptq", "owq", "gwq")
METHODS = INTEGER_METHODS + CODEBOOK_METHODS


def option(default: Any, help: str, choices: tuple | None = None, record: bool = True, **kw: Any) -> Any:
    """A ``QuantConfig`` field with its help text: the one definition the CLI flags and the TRL arguments are
    generated from (:mod:`wct.quantize.options`).  ``record=False``: how the run was done, not what it produced
    (left out of :meth:`QuantConfig.to_dict`, so checkpoints do not depend on it)."""
    meta = {"help": help, "record": record}
    if choices is not None:
        meta["choices"] = choices
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class QuantConfig:
    """How to quantize a model.

    ``method``: ``rtn`` (round to nearest, integer), ``gptq``, ``owq``, ``gwq``
    (calibrated, integer), or a codebook format ``nf4``/``af4``/``bof4``/``bof4s``
    (round to nearest in the codebook; with ``opq=True`` magnitude outliers stay in 16-bit).
    Every field carries its help text; the ``wct quantize`` flags and the recipes' arguments are made from them.
    """

    method: str = option("bof4s", "quantization method: integer rtn/gptq/owq/gwq or a 4-bit codebook", METHODS)
    wbits: int = option(4, "integer bit width for rtn/gptq/owq/gwq (2, 3, 4, 8); codebooks are 4-bit")
    group_size: int | None = option(None, "integer group size along the input (default: one scale per output channel)")
    sym: bool = option(False, "symmetric integer grid (no zero point)")
    block_size: int = option(64, "codebook block size (weights per absmax scale)")
    double_quant: bool = option(False, "8-bit quantization of the codebook block scales")
    # outliers
    target_bits: float | None = option(
        None, "owq only: average bits per weight incl. the 16-bit weak columns, above wbits (e.g. 3.01, 3.1); "
              "default wbits + 0.01 (the OWQ paper's 3.01 / 4.01)")
    owq_sensitivity: str = option("hessian_error", "owq: how weak columns are ranked (H_jj x quantization error, or "
                                  "H_jj alone)", ("hessian_error", "hessian"))
    outlier_ratio: float = option(0.01, "gwq: fraction of the weights kept in 16-bit")
    gwq_score: str = option("gradient", "gwq: outlier score, |gradient| or Fisher g^2 x quantization error^2",
                            ("gradient", "fisher"))
    gwq_solver: str = option("gptq", "gwq: how the non-outlier weights are quantized", ("gptq", "rtn"))
    gwq_samples: int = option(8, "gwq: calibration windows whose loss gradients score the weights")
    opq: bool = option(False, "codebook formats: keep OPQ magnitude outliers in 16-bit")
    opq_quantile: float = option(0.95, "OPQ: a Gaussian block has an outlier with probability 1 - this")
    outlier_dtype: str = option("float16", "dtype of weak columns and sparse outliers", ("float16", "bfloat16", "float32"))
    # GPTQ
    percdamp: float = option(0.01, "GPTQ: Hessian damping, as a fraction of its mean diagonal")
    lazy_batch: int = option(128, "GPTQ: columns quantized together before the rest is updated (speed only)")
    act_order: bool = option(
        True, "GPTQ/OWQ/GWQ: quantize columns by descending Hessian diagonal (the largest single quality lever we "
              "measured, docs/benchmarks/quality.md); with groups it uses static groups, so storage is unchanged")
    true_sequential: bool = option(False, "GPTQ/OWQ/GWQ: solve a block one input group at a time, each on the "
                                   "outputs of the groups already quantized")
    range_search: str | None = option(
        None, "scale/zero tuning: minmax, mse (GPTQ's shrink search) or grid (OWQ's width x zero-point search); "
              "default: grid for owq, minmax otherwise", ("minmax", "mse", "grid"))
    # Mixture-of-Experts
    expert_min_tokens: int | None = option(
        None, "calibrated methods: experts routed fewer calibration tokens than this are calibrated on every token "
              "of their block (routing weight 0 where not chosen); default: the expert's input width, below which "
              "its Hessian is rank-deficient")
    # scope
    include_lm_head: bool = option(False, "also quantize the output head (round to nearest)")
    skip_modules: tuple[str, ...] = option((), "layer names containing any of these stay in full precision")
    allow_dense: bool = option(False, "quantize even if some decoder-block weights have no packed form (they stay "
                               "dense and the bits per weight say so); without it such a model is refused")
    # where the work runs (not part of the result: never written into a checkpoint's record)
    calibration_device: str | None = option(
        None, "calibrated methods: keep the model in CPU RAM and move one decoder block at a time to this device "
              "(e.g. cuda) to calibrate and pack it; that device then holds one block, the calibration activations "
              "and the solver state, not the model (docs/distributed.md, Calibration). Default: where the model is",
        record=False)

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
        for name in ("owq_sensitivity", "gwq_score", "gwq_solver", "outlier_dtype"):
            choices = next(f.metadata["choices"] for f in fields(self) if f.name == name)
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}")
        if self.gwq_samples < 1:
            raise ValueError(f"gwq_samples must be at least 1, got {self.gwq_samples}")
        if self.range_search not in (None, "minmax", "mse", "grid"):
            raise ValueError(f"range_search must be 'minmax', 'mse' or 'grid' (or None for the method default), got "
                             f"{self.range_search!r}")
        self.skip_modules = tuple(self.skip_modules)
        if self.calibration_device is not None:
            self.calibration_device = str(self.calibration_device)
            if self.calibration_device.split(":")[0] not in ("cpu", "cuda", "xpu", "mps", "npu", "hpu"):
                raise ValueError(f"calibration_device={self.calibration_device!r} is not a device: use e.g. 'cuda', "
                                 "'cuda:1' or 'cpu' (or leave it unset to calibrate where the model is)")
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
        """The options that define the result (``record=False`` fields, such as ``calibration_device``, left out)."""
        d = asdict(self)
        d["skip_modules"] = list(self.skip_modules)
        for f in fields(self):
            if not f.metadata.get("record", True):
                d.pop(f.name)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Rebuild a saved config, including those written before options were typed (``blocksize``, ``extra``).

        Unknown keys (e.g. from a newer wct) raise: silently dropping an option would change the method.
        """
        d = dict(d)
        if "blocksize" in d:  # renamed: it is GPTQ's lazy batch, not a block of weights
            d.setdefault("lazy_batch", d.pop("blocksize"))
        extra = d.pop("extra", None) or {}
        for key, value in extra.items():
            if key not in _LEGACY_EXTRA:
                raise ValueError(f"saved QuantConfig.extra holds {key!r}, which this wct does not know; "
                                 f"known: {sorted(_LEGACY_EXTRA)}")
            d.setdefault(_LEGACY_EXTRA[key], value)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"saved QuantConfig has options this wct does not know: {unknown}; upgrade wct")
        with warnings.catch_warnings():  # a record being read back: the default target_bits was announced at the time
            warnings.simplefilter("ignore", UserWarning)
            return cls(**d)


# the untyped options of earlier versions, and the fields that replaced them
_LEGACY_EXTRA = {"owq_sensitivity": "owq_sensitivity", "gwq_score": "gwq_score", "gwq_solver": "gwq_solver",
                 "gwq_samples": "gwq_samples"}

"""``ActQuantConfig``: how the weights and the Linear inputs of a model are quantized (OutlierTune and baselines)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from wct.nn.act_quant_linear import check_bits

ACT_METHODS = ("outliertune", "per-tensor", "per-token", "smoothquant")
_NEEDS_STATS = ("outliertune", "smoothquant")


@dataclass
class ActQuantConfig:
    """How to quantize the weights and the Linear inputs of a model (see the module docstring).

    ``method``: ``outliertune`` | ``per-tensor`` | ``per-token`` | ``smoothquant``.
    ``wbits`` / ``abits``: 4..8 (W8A8, W6A6 ...); weights are symmetric per output row.
    ``symmetrize``: OutlierTune's channel shift (folded into the bias).
    ``shift_estimate``: ``"range"`` (midpoint of the global min/max: the tightest symmetric range,
    the default) or ``"sample-mean"`` (the reference: mean over windows of each window's midpoint).
    ``fold_gamma``: fold the norm's γ (and β) into the following Linears first (the reference's
    Llama variant, to be used with ``symmetrize=False``); verified exact on a calibration batch.
    ``percentile``: static ranges from the ``p``-th / ``(100−p)``-th percentile per channel
    (averaged over calibration batches) instead of min/max; outliers beyond are clipped.
    ``per_channel_layers``: ``"norm-fed"`` (QKV, gate/up, fc1: the reference) or ``"all"``.
    ``alpha``: SmoothQuant migration strength.
    ``weight_solver``: ``"rtn"`` (min-max round to nearest) or ``"gptq"`` (on the folded weight,
    with the Hessian of the transformed inputs; implies sequential calibration).
    ``sequential``: calibrate block ``i+1`` on the outputs of the already quantized blocks (the weight
    engine's way) instead of one forward of the float model (the reference's way, the default: on
    SmolLM2-135M W6A6 it measured 31.4 vs 32.0 ppl, and costs one model pass instead of two per block).
    ``layers``: name substrings to quantize (empty: every decoder-block Linear);
    ``skip_modules``: name substrings to leave in floating point.
    """

    method: str = "outliertune"
    wbits: int = 8
    abits: int = 8
    symmetrize: bool = True
    shift_estimate: str = "range"
    fold_gamma: bool = False
    percentile: float | None = None
    per_channel_layers: str = "norm-fed"
    alpha: float = 0.5
    weight_solver: str = "rtn"
    sequential: bool = False
    percdamp: float = 0.01
    layers: tuple[str, ...] = ()
    skip_modules: tuple[str, ...] = ()
    batch_size: int = 8

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        if self.method not in ACT_METHODS:
            raise ValueError(f"unknown activation-quantization method {self.method!r}; choose one of {ACT_METHODS}")
        check_bits("wbits", self.wbits)
        check_bits("abits", self.abits)
        if self.shift_estimate not in ("sample-mean", "range"):
            raise ValueError(f"shift_estimate must be 'sample-mean' or 'range', got {self.shift_estimate!r}")
        if self.per_channel_layers not in ("norm-fed", "all"):
            raise ValueError(f"per_channel_layers must be 'norm-fed' or 'all', got {self.per_channel_layers!r}")
        if self.percentile is not None and not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100] (e.g. 99.99) or None for min/max, got {self.percentile}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.weight_solver not in ("rtn", "gptq"):
            raise ValueError(f"weight_solver must be 'rtn' or 'gptq', got {self.weight_solver!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if isinstance(self.layers, str) or isinstance(self.skip_modules, str):
            raise ValueError("layers / skip_modules are tuples of name substrings, not a single string")
        self.layers, self.skip_modules = tuple(self.layers), tuple(self.skip_modules)

    @property
    def calibrated(self) -> bool:
        """Whether calibration windows are needed (static ranges, smoothing factors or GPTQ Hessians)."""
        return self.method in _NEEDS_STATS or self.weight_solver == "gptq" or self.fold_gamma

    @property
    def tag(self) -> str:
        return f"w{self.wbits}a{self.abits}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"], d["skip_modules"] = list(self.layers), list(self.skip_modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActQuantConfig":
        d = {k: v for k, v in d.items() if k != "extra"}  # an untyped dict in earlier versions, never read
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"saved ActQuantConfig has options this wct does not know: {unknown}; upgrade wct")
        return cls(**{k: (tuple(v) if k in ("layers", "skip_modules") else v) for k, v in d.items()})

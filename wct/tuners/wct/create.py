"""Give weak columns to a base that has none ("WCT over BOF4 / NF4 / RTN").

WCT trains the 16-bit columns an OWQ base keeps beside its packed weights.  A
codebook or RTN base has none, so here ``k`` columns per layer are split out of
the packed base into 16-bit storage, after which WCT can tune them.

**Which columns.**  OWQ ranks column ``j`` by ``H_jj · ‖W_j − Q(W)_j‖²``: the output
error that column's quantization causes.  After quantization the original ``W``
is gone, so ``‖ΔW_j‖²`` cannot be measured.  What *can* be computed is its
expectation given the stored code: if the original value was anywhere in the
quantization cell of its code (uniformly), ``E[Δw²]`` is the second moment of
the cell around its level, which we know exactly from the format (``s²/12`` for
an integer grid; the Voronoi cell between neighbouring levels times the block
scale for a codebook).  The scores are:

* ``"hessian_error"``: ``H_jj · Σ_r E[Δw_rj² | code]``, the expected OWQ
  sensitivity (calibration data needed for ``H_jj``);
* ``"activation"``: ``H_jj`` alone (OWQ's "hessian" mode): channels that carry
  large activations amplify any error, and any update, in their column;
* ``"fisher"``: ``Σ_b Σ_r g_b[r, j]² · ΔW[r, j]²`` with ``g_b`` the loss gradient w.r.t. the
  weight on batches of the *fine-tuning* data (``data=``), ``ΔW`` exact when an unquantized
  ``reference`` model is given, else ``E[ΔW² | code]`` as above: task-aware columns
  (:mod:`.fisher`);
* ``"weight"``: ``‖W_deq[:, j]‖₂`` with no data at all.  A weak proxy: how much a
  column matters is driven by the *activations* it multiplies (LLMs have a few
  input channels with 10-100x larger activations, invisible in the weights), and
  for per-channel integer grids the rounding error does not even depend on the
  column's magnitude.  It is the only choice a config can make on its own.

``H_jj = E[x_j²]`` needs only the diagonal, so the calibration pass keeps one
``[in_features]`` vector per layer (not a full ``H``) and runs the whole model at
once with forward hooks: cheap even for large models.

**Splitting.**  The layer is rebuilt with :meth:`QuantLinear.from_linear` over its
own dequantized weight with the chosen columns split out.  For per-channel
integer formats the remaining codes and scales are kept as they are, so the
split is exact.  For group-wise integer and block codebook formats the groups
and blocks realign once columns leave, so the rest of the base is requantized
(round to nearest in the same format): a small extra error, of the order of
the format's own rounding error, on the remaining weights.  The split-out
columns hold the dequantized values in the layer's 16-bit outlier dtype.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from torch import nn
from tqdm.auto import tqdm

from wct.formats.codebook_format import CodebookFormat
from wct.formats.integer import IntegerFormat
from wct.nn import QuantLinear
from wct.outliers import keep_index
from wct.quantize.api import QUANT_ATTR

from .config import CREATE_SCORES

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------------------------------
def _cell_second_moment(levels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``E[(u − L_c)²]`` for ``u`` uniform on the cell of level ``c`` (levels ascending in ``[-1, 1]``)."""
    mids = (levels[:-1] + levels[1:]) / 2
    lo = torch.cat([levels.new_tensor([-1.0]), mids])
    hi = torch.cat([mids, levels.new_tensor([1.0])])
    lo, hi = torch.minimum(lo, levels), torch.maximum(hi, levels)
    width = (hi - lo).clamp(min=1e-12)
    m2 = ((hi - levels) ** 3 - (lo - levels) ** 3) / (3 * width)
    return m2[codes.long()]


@torch.no_grad()
def expected_quant_error(layer: QuantLinear) -> torch.Tensor:
    """``[in]``: ``Σ_r E[Δw_rj² | code]``, the expected squared rounding error of each column.

    Positions held exactly (sparse outliers) count zero.  For a format this module
    does not know, falls back to a relative-error model (``E[Δw²] ∝ w_deq²``).
    """
    return expected_quant_error_matrix(layer).sum(0)


@torch.no_grad()
def expected_quant_error_matrix(layer: QuantLinear) -> torch.Tensor:
    """``[out, in]`` fp32: ``E[Δw_rj² | code]`` per element (see :func:`expected_quant_error`)."""
    if layer.n_weak:
        raise ValueError("expected_quant_error is defined for layers without weak columns")
    qt = layer.quantized_base()
    fmt = layer.fmt
    out_f, in_f = qt.shape
    if isinstance(fmt, IntegerFormat):
        g_idx = fmt.group_index(in_f, qt.data["scales"].device)
        s = qt.data["scales"].float()[:, g_idx]
        err = s.pow(2) / 12.0
    elif isinstance(fmt, CodebookFormat):
        codes = qt.codes()
        m2 = _cell_second_moment(qt.data["code"].float(), codes)
        scales = fmt.scales(qt.data).float()
        flat = torch.arange(out_f * in_f, device=codes.device) // fmt.block_size
        err = m2 * scales[flat].view(out_f, in_f).pow(2)
    else:
        err = layer.dequantize_weight(torch.float32).pow(2)
    sp = layer.sparse_outliers()
    if sp is not None:
        err = err.masked_fill(sp.mask(), 0.0)
    return err


@torch.no_grad()
def column_scores(layer: QuantLinear, score: str, act_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``[in]`` score per input column (larger = split out first); see the module docstring."""
    if score not in CREATE_SCORES:
        raise ValueError(f"score must be one of {CREATE_SCORES}, got {score!r}")
    if score == "weight":
        return layer.dequantize_weight(torch.float32).norm(dim=0)
    if score == "fisher":
        if act_sq is None:
            raise ValueError("score='fisher' needs its per-column Fisher scores (create_weak_columns(..., data=...))")
        return act_sq.float()
    if act_sq is None:
        raise ValueError(f"score={score!r} needs calibration statistics: pass calibration=LongTensor[n, seq_len]")
    if score == "activation":
        return act_sq.float()
    return act_sq.float() * expected_quant_error(layer)


def pick_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` best columns, ascending; ties go to the lower index, so the choice is reproducible."""
    order = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
    return order[:k].sort().values.to(scores.device)


# ---------------------------------------------------------------------------------------------------------------------
# splitting
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def split_weak_columns(layer: QuantLinear, columns: torch.Tensor, values: torch.Tensor | None = None) -> QuantLinear:
    """A new ``QuantLinear`` equal to ``layer`` with ``columns`` moved into 16-bit weak columns.

    Exact for per-channel integer formats, a small requantization otherwise (see
    the module docstring).  Sparse outliers stay sparse unless they fall in a
    split column, which then holds them exactly.  ``values``: ``[out, k]`` the split
    columns take instead of their dequantized values (e.g. the unquantized weights'
    columns, which undoes their quantization error); columns ascending.
    """
    if layer.n_weak:
        raise ValueError(f"the layer already has {layer.n_weak} weak columns; split_weak_columns adds them to bases without")
    columns = torch.as_tensor(columns, device=layer.qweight.device).long().unique(sorted=True)
    k = int(columns.numel())
    if not 0 < k < layer.in_features:
        raise ValueError(f"k={k} columns must be in [1, in_features={layer.in_features})")
    if int(columns.min()) < 0 or int(columns.max()) >= layer.in_features:
        raise ValueError(f"column index out of range [0, {layer.in_features})")
    weight = layer.dequantize_weight(torch.float32)
    if values is not None:
        if tuple(values.shape) != (layer.out_features, k):
            raise ValueError(f"values shape {tuple(values.shape)} != {(layer.out_features, k)}")
        weight[:, columns] = values.to(weight)
    sp = layer.sparse_outliers()
    mask = None
    if sp is not None:
        mask = sp.mask()
        mask[:, columns] = False  # a split column holds these exactly now
        if not bool(mask.any()):
            mask = None  # (from_linear would build an nnz=0 layer and then fail copying its CSR)
    fmt = layer.fmt
    qweight = None
    if isinstance(fmt, IntegerFormat) and fmt.n_groups(layer.in_features) == 1 == fmt.n_groups(layer.in_features - k):
        qt = layer.quantized_base()
        keep = keep_index(layer.in_features, columns)
        zeros = fmt.zeros_matrix(qt.data, qt.shape)
        qweight = fmt.from_codes(qt.codes()[:, keep], qt.data["scales"], zeros)
    elif isinstance(fmt, IntegerFormat) and fmt.group_size and (layer.in_features - k) % fmt.group_size:
        fmt = dataclasses.replace(fmt, partial_groups=True)  # the last group of the shorter base is partial
    return QuantLinear.from_linear(
        layer, fmt, weak_columns=columns, outlier_mask=mask, qweight=qweight, weight=weight,
        outlier_dtype=layer.outlier_dtype,
    )


# ---------------------------------------------------------------------------------------------------------------------
# calibration statistics
# ---------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def activation_energy(
    model: nn.Module, layers: dict[str, nn.Module], calibration: torch.Tensor, batch_size: int = 8, progress: bool = True
) -> dict[str, torch.Tensor]:
    """``E[x_j²]`` (the Hessian diagonal up to a factor 2) of every layer's input, by forward hooks.

    Memory: one ``[in_features]`` fp32 vector per layer plus one batch of activations.
    """
    if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"calibration must be a LongTensor [n_samples, seq_len] of token ids, got {calibration.dtype} "
            f"{tuple(calibration.shape)}"
        )
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(_mod, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        for s in tqdm(range(0, calibration.shape[0], batch_size), desc="wct: activation stats", disable=not progress):
            kwargs = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
            model(input_ids=calibration[s : s + batch_size].to(device), **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = sorted(set(layers) - set(sums))
    if missing:
        raise RuntimeError(f"calibration never reached these layers: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {n: sums[n] / counts[n] for n in layers}


# ---------------------------------------------------------------------------------------------------------------------
# the verb
# ---------------------------------------------------------------------------------------------------------------------
def _k_for(name: str, k: int | dict[str, int]) -> int:
    if isinstance(k, int):
        return k
    for pattern, value in k.items():
        if name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name):
            return int(value)
    return 0


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def record_layer_spec(model: nn.Module, name: str, layer: QuantLinear) -> None:
    """Keep ``model.wct_quantization['layers']`` (what checkpoints serialise) in step with a rebuilt layer."""
    record = getattr(model, QUANT_ATTR, None)
    if isinstance(record, dict) and isinstance(record.get("layers"), dict):
        record["layers"][name] = layer.spec()


def output_embedding(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    try:
        return get_out() if callable(get_out) else None
    except (NotImplementedError, AttributeError):
        return None


def _dense_weight(reference: nn.Module, name: str, layer: QuantLinear) -> torch.Tensor:
    """The unquantized ``[out, in]`` weight of layer ``name`` in ``reference`` (Conv1D stores it transposed)."""
    try:
        mod = reference.get_submodule(name)
    except AttributeError:
        raise ValueError(f"reference model has no module {name!r}: pass the unquantized copy of this model") from None
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"reference module {name!r} has no 2-D weight (got {type(mod).__name__})")
    if type(mod).__name__ == "Conv1D":
        w = w.t()
    if tuple(w.shape) != (layer.out_features, layer.in_features):
        raise ValueError(f"reference weight of {name!r} is {tuple(w.shape)}, the layer is "
                         f"{(layer.out_features, layer.in_features)}")
    return w.detach()


def create_weak_columns(
    model: nn.Module,
    k: int | dict[str, int],
    calibration: torch.Tensor | None = None,
    score: str = "hessian_error",
    progress: bool = True,
    batch_size: int = 8,
    data=None,
    reference: nn.Module | None = None,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Split ``k`` weak columns out of every ``QuantLinear`` that has none; returns ``{name: columns}``.

    ``k``: columns per layer, or ``{name, suffix or regex: k}`` (unmatched layers are
    skipped): the budget, the same whichever score picks the columns.  ``calibration``:
    ``LongTensor [n_samples, seq_len]`` token windows, needed by ``score="hessian_error"``
    (default) and ``"activation"``; ``"weight"`` needs none (and is a weak proxy, see the
    module docstring).  ``score="fisher"`` needs ``data``: batches of the *fine-tuning* data,
    a ``LongTensor [n, seq_len]`` (language-model loss on every token) or an iterable of
    dicts of model inputs with ``labels`` (e.g. a completion-only collator's batches); at
    most ``max_batches`` of them, ``batch_size`` rows per batch for a tensor.
    ``reference``: the unquantized model (same module names); with it the Fisher score uses
    the exact ``ΔW = W − deq(W)`` and the split columns take the unquantized values (with
    any score), see :mod:`.fisher`.  The output embedding is left alone, as PEFT's
    "all-linear" does.  Run this *before* ``get_peft_model``; the model is changed in place.
    If the model carries a transformers ``quantization_config``,
    :func:`wct.integrations.transformers.save_pretrained` re-syncs it (or call
    ``sync_quantization(model)`` before ``model.save_pretrained``).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from .fisher import gradient_energy

    if score not in CREATE_SCORES:
        raise ValueError(f"score must be one of {CREATE_SCORES}, got {score!r}")
    if isinstance(k, bool) or not isinstance(k, (int, dict)):
        raise TypeError(f"k must be an int or a dict {{name: k}}, got {type(k).__name__}")
    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("the model already has PEFT adapters: call create_weak_columns before get_peft_model")
    out_emb = output_embedding(model)
    targets = {
        n: m for n, m in model.named_modules()
        if isinstance(m, QuantLinear) and m is not out_emb and m.n_weak == 0 and _k_for(n, k) > 0
    }
    if not targets:
        raise ValueError(
            "no QuantLinear without weak columns matched: quantize the model first (wct.quantize_model) and check k"
        )
    for n, m in targets.items():
        kk = _k_for(n, k)
        if kk >= m.in_features:
            raise ValueError(f"{n}: k={kk} must be below in_features={m.in_features}")
    dense = {n: _dense_weight(reference, n, m) for n, m in targets.items()} if reference is not None else None
    stats = None
    if score == "fisher":
        if data is None:
            raise ValueError(
                "score='fisher' needs batches of the fine-tuning data: pass data=LongTensor[n, seq_len] or a list of "
                "dicts of model inputs with labels"
            )

        def factor(name: str) -> torch.Tensor:
            layer = targets[name]
            if dense is None:
                return expected_quant_error_matrix(layer)
            delta = dense[name].to(device=layer.qweight.device, dtype=torch.float32)
            return (delta - layer.dequantize_weight(torch.float32)).pow_(2)

        stats = gradient_energy(model, targets, data, factor, batch_size=batch_size, max_batches=max_batches,
                                progress=progress)
    elif score != "weight":
        if calibration is None:
            raise ValueError(
                f"score={score!r} needs calibration data: pass calibration=LongTensor[n_samples, seq_len] "
                "(e.g. wct.data.get_calibration_windows(...)), or use score='weight' (data-free, weaker)"
            )
        stats = activation_energy(model, targets, calibration, batch_size=batch_size, progress=progress)
    chosen: dict[str, torch.Tensor] = {}
    for n, m in tqdm(targets.items(), desc=f"wct: split weak columns ({score})", disable=not progress):
        cols = pick_columns(column_scores(m, score, None if stats is None else stats[n]), _k_for(n, k))
        values = None if dense is None else dense[n][:, cols.to(dense[n].device)]
        new = split_weak_columns(m, cols, values=values)
        set_submodule(model, n, new)
        record_layer_spec(model, n, new)
        chosen[n] = cols
    log.info("wct: split weak columns out of %d layers (score=%s)", len(chosen), score)
    return chosen

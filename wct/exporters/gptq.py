"""``--format gptq``: the GPTQ checkpoint layout transformers (GPTQModel), vLLM and SGLang load, plus weak columns as LoRA.

The packed integer base of every layer (GPTQ, OWQ, GWQ's dense part, RTN int2/3/4/8; per-channel
or grouped) is written as ``qweight``/``qzeros``/``scales``/``g_idx`` so that the loaders decode
exactly wct's values (:mod:`wct.exporters.gptq_pack` has the bit layout).  Why it is exact: the
codes, the fp16 scales and the integer zero points are copied, never recomputed, and ``s * (q - z)``
with an fp16 ``s`` and a small integer is exact in fp32 (and rounds once, like wct's own fp16
dequantization, in fp16).

Decisions, each recorded in the report:

* **weak columns** are zero columns of the base (their group's zero code) plus a PEFT LoRA adapter
  (:mod:`wct.exporters.lora`).  Inserting them shifts later columns out of their ``j // group_size``
  group, so grouped layers with weak columns need ``g_idx`` and the config says ``desc_act: true``
  (act-order), which every GPTQ loader honours.
* **zero points**: v1 (``checkpoint_format: "gptq"``) stores ``zero - 1``, so a zero point of 0
  cannot be stored.  Such a group is shifted up by one code (same decoded values) when its codes
  leave room; otherwise ``auto`` writes ``"gptq_v2"`` (GPTQModel and recent vLLM read it).
* **sparse outliers** (GWQ/OPQ) have no GPTQ form: each is rounded onto its group's grid and the
  error is reported; ``--format dense`` keeps them exactly.
* **codebook formats** (NF4/AF4/BOF4) have no GPTQ form: refused, pointing to ``dense``/``gguf``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .base import ExportOptions, ExportTarget, UnsupportedExportError, cast_dense
from .gptq_pack import gptq_tensors, packable
from .grid import IntegerGrid, base_weight, is_integer_layer, read_integer_grid
from .lora import ADAPTER_DIR, PADDED_ADAPTER_DIR, WeakColumns, write_peft_adapter
from .report import ExportReport
from .source import ExportSource

_BLOCK = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)$")


def _block_split(name: str) -> tuple[str, int, str] | None:
    m = _BLOCK.match(name)
    return (m["prefix"], int(m["index"]), m["rest"]) if m else None


class GPTQTarget(ExportTarget):
    name = "gptq"
    summary = "GPTQ checkpoint (qweight/qzeros/scales/g_idx) + weak columns as a PEFT LoRA adapter"

    # ------------------------------------------------------------------ checks
    def check(self, source: ExportSource, options: ExportOptions) -> None:
        layers = source.quant_layers()
        codebook = sorted({m.fmt.name for m in layers.values() if not is_integer_layer(m)})
        if codebook:
            raise UnsupportedExportError(
                f"{'/'.join(codebook)} is a codebook format: GPTQ stores uniform integer grids only, so it has no GPTQ "
                "form. Use --format dense (merged 16-bit safetensors, any engine) or --format gguf (llama.cpp, "
                "requantized with the error reported)"
            )
        grids = {(m.fmt.bits, m.fmt.group_size, m.fmt.sym) for n, m in layers.items() if _block_split(n)}
        if len(grids) > 1:
            raise UnsupportedExportError(
                f"the packed layers use different grids {sorted(grids, key=str)} (bits, group_size, sym), but a GPTQ "
                "config has one; re-quantize with one setting, or use --format dense / gguf"
            )
        for n, m in layers.items():
            bits = m.fmt.bits
            if not packable(m.in_features, bits) or not packable(m.out_features, bits):
                raise UnsupportedExportError(
                    f"{n}: [{m.out_features} x {m.in_features}] cannot be packed as GPTQ {bits}-bit (in and out "
                    f"features must fill whole int32 words{', i.e. be multiples of 32' if bits == 3 else ''}); use "
                    "--format dense or gguf"
                )
        self._quantized_names(source)  # raises for a non-uniform mix of packed and dense block Linears

    def _quantized_names(self, source: ExportSource) -> list[str] | None:
        """``modules_in_block_to_quantize`` when some block Linears stay dense (same ones in every block), else None."""
        packed: dict[tuple[str, int], set[str]] = {}
        dense: dict[tuple[str, int], set[str]] = {}
        for n in source.quant_layers():
            s = _block_split(n)
            if s:
                packed.setdefault(s[:2], set()).add(s[2])
        for n in source.dense_linears():
            s = _block_split(n)
            if s:
                dense.setdefault(s[:2], set()).add(s[2])
        if not any(dense.values()):
            return None
        kinds = {frozenset(v) for v in packed.values()} | {frozenset() for k in dense if k not in packed}
        if len(kinds) != 1:
            example = sorted(f"{p}.{i}.{r}" for (p, i), rs in dense.items() for r in rs)[:3]
            raise UnsupportedExportError(
                f"some decoder-block Linears are dense (e.g. {example}) and the set differs between blocks; GPTQ "
                "configs can only skip the same modules in every block. Use --format dense or gguf, or merge LoRA "
                "with the WCT tuner (it keeps layers packed)"
            )
        return sorted(next(iter(kinds)))

    # ------------------------------------------------------------------ writing
    def write(self, source: ExportSource, folder: Path, options: ExportOptions, report: ExportReport,
              progress: bool = True) -> None:
        from safetensors.torch import save_file

        layers = {n: m for n, m in source.quant_layers().items() if _block_split(n)}
        outside = {n: m for n, m in source.quant_layers().items() if n not in layers}  # e.g. a packed lm_head
        if not layers:
            raise UnsupportedExportError("no packed layer inside a decoder block: nothing to write as GPTQ")
        first = next(iter(layers.values())).fmt
        bits, group_size, sym = first.bits, first.group_size, first.sym

        grids: dict[str, IntegerGrid] = {}
        notes: dict[str, list[str]] = {}
        for n, m in tqdm(layers.items(), desc="gptq: reading grids", disable=not progress, leave=False):
            grid = read_integer_grid(m)
            if not torch.equal(grid.decode(), base_weight(m)):  # a guard against our own reader, not the test oracle
                raise AssertionError(f"{n}: the full-width grid does not decode to wct's base; this is a wct bug")
            grid, n_sparse = grid.with_sparse_on_grid()
            notes[n] = [f"{n_sparse} sparse outliers rounded onto the grid"] if n_sparse else []
            grids[n] = _full_groups(grid, m.in_features, group_size)

        shifted = 0
        if options.checkpoint_format in ("auto", "gptq") and not sym:
            for n, g in grids.items():
                g2, k = _shift_zero_points(g)
                grids[n], shifted = g2, shifted + k
        needs_v2 = any(bool((g.zeros < 1).any()) for g in grids.values())
        if needs_v2 and options.checkpoint_format == "gptq":
            bad = next(n for n, g in grids.items() if bool((g.zeros < 1).any()))
            raise UnsupportedExportError(
                f"{bad}: a group has zero point 0 and uses the top code, which GPTQ v1 (checkpoint_format 'gptq', "
                "stores zero - 1) cannot hold; use --checkpoint-format gptq_v2 (or auto)"
            )
        ckpt_format = "gptq_v2" if (needs_v2 or options.checkpoint_format == "gptq_v2") else "gptq"
        desc_act = bool(group_size) and any(not g.trivial_g_idx(group_size) for g in grids.values())

        tensors: dict[str, torch.Tensor] = {}
        weak: list[WeakColumns] = []
        for n, m in tqdm(layers.items(), desc="gptq: packing", disable=not progress):
            g = grids[n]
            scales16 = g.scales.to(torch.float16)
            if not torch.equal(scales16.float(), g.scales.float()):
                notes[n].append(f"{m.fmt.scale_dtype} scales rounded to float16")
                g = IntegerGrid(g.bits, g.sym, g.group_size, g.codes, scales16, g.zeros, g.g_idx, g.weak_idx,
                                g.weak_values, None)
            for k, t in gptq_tensors(g.codes, g.scales, g.zeros, g.g_idx, bits, v1=ckpt_format == "gptq").items():
                tensors[f"{n}.{k}"] = t
            if m.bias is not None:
                tensors[f"{n}.bias"] = cast_dense(report, f"{n}.bias", m.bias, options.torch_dtype)
            decoded = g.decode()
            target = f"gptq int{bits} " + (f"g{group_size}" if group_size else "per-channel")
            if g.weak_idx is not None:
                wc = WeakColumns(n, m.in_features, g.weak_idx, g.weak_values)
                weak.append(wc)
                decoded = decoded + wc.delta()
                target += f" + lora r={wc.k}"
            report.add(n, target, decoded, m.dequantize_weight(torch.float32), note="; ".join(notes[n]))

        for n, m in outside.items():  # packed layers outside the blocks (lm_head): dense in a GPTQ checkpoint
            tensors[f"{n}.weight"] = cast_dense(report, f"{n}.weight", m.dequantize_weight(torch.float32),
                                                options.torch_dtype, note="packed outside the decoder blocks: "
                                                "written dense")
            if m.bias is not None:
                tensors[f"{n}.bias"] = cast_dense(report, f"{n}.bias", m.bias, options.torch_dtype)
        for name, t in source.dense_tensors().items():
            tensors[name] = cast_dense(report, name, t, options.torch_dtype)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})

        qcfg = {
            "quant_method": "gptq", "bits": bits, "group_size": group_size or -1, "desc_act": desc_act, "sym": sym,
            "checkpoint_format": ckpt_format, "format": ckpt_format, "true_sequential": True, "static_groups": False,
            "damp_percent": 0.01, "lm_head": False, "meta": {"quantizer": [f"wct:{_wct_version()}"]},
        }
        skip = self._quantized_names(source)
        if skip is not None:
            qcfg["modules_in_block_to_quantize"] = [skip]
        cfg = dict(source.config)
        cfg["quantization_config"] = qcfg
        for key in ("dtype", "torch_dtype"):
            if key in cfg or key == "dtype":
                cfg[key] = options.dtype
        if not cfg.get("architectures"):
            cfg["architectures"] = [type(source.model).__name__]
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (folder / "quantize_config.json").write_text(
            json.dumps({k: v for k, v in qcfg.items() if k not in ("format", "modules_in_block_to_quantize")},
                       indent=2) + "\n")
        for fname, data in source.tokenizer_files.items():
            (folder / fname).write_bytes(data)

        if weak:
            write_peft_adapter(folder / ADAPTER_DIR, weak, padded=False)
            ranks = write_peft_adapter(folder / PADDED_ADAPTER_DIR, weak, padded=True)
            report.notes.append(
                f"weak columns of {len(weak)} layers are a LoRA adapter (exact, scaling 1): {ADAPTER_DIR}/ has each "
                f"layer's own rank (PEFT rank_pattern), {PADDED_ADAPTER_DIR}/ one rank r={max(ranks.values())} padded "
                "with zeros for engines that ignore rank_pattern (vLLM, SGLang); the base alone lacks them")
            r = max(ranks.values())
            report.notes.append(
                f"vLLM: vllm serve OUT --quantization gptq --dtype float16 --enable-lora --max-lora-rank "
                f"{vllm_max_lora_rank(r)} --lora-modules wct=OUT/{PADDED_ADAPTER_DIR} (then request model 'wct')"
                if r <= VLLM_MAX_LORA_RANKS[-1] else
                f"rank {r} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}: use --format dense for vLLM")
        report.notes.append(
            f"checkpoint_format '{ckpt_format}'" + (" (a zero point of 0 needs v2: GPTQModel reads it; vLLM's gptq kernel has a v2 mode, older loaders do not)"
                                                     if ckpt_format == "gptq_v2" and needs_v2 else "")
            + (f"; {shifted} zero-point groups shifted by one code for v1 (decoded values unchanged)" if shifted else ""))
        if desc_act:
            report.notes.append("desc_act true: g_idx places the columns after each weak column in their stored group")
        if group_size and any(m.in_features % group_size for m in layers.values()):
            report.notes.append(f"group_size {group_size} does not divide every in_features (last group partial): "
                                "transformers/GPTQModel load it, vLLM refuses unaligned groups")
        if not sym:
            report.notes.append("asymmetric grid (sym false): vLLM runs the gptq/exllama kernel (Marlin needs sym)")
        clashes = fused_g_idx_clashes({n: g.g_idx for n, g in grids.items()}) if desc_act else []
        if clashes:
            report.notes.append(
                f"vLLM fuses {'/'.join(clashes[0])} into one layer with one g_idx, but their weak columns differ, so "
                f"their g_idx differ ({len(clashes)} such groups): vLLM would decode them wrongly. transformers/"
                "GPTQModel load them exactly; for vLLM export --format dense, or quantize per-channel (no g_idx)")
        report.options["gptq"] = {k: qcfg[k] for k in ("bits", "group_size", "desc_act", "sym", "checkpoint_format")}


# The values vLLM accepts for --max-lora-rank (vllm/config/lora.py, MaxLoRARanks); the default is 16.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds rank ``r``."""
    for v in VLLM_MAX_LORA_RANKS:
        if v >= r:
            return v
    raise UnsupportedExportError(f"LoRA rank {r} exceeds vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")


# Sibling projections vLLM loads into one fused layer (its packed_modules_mapping for Llama-style models).  The fused
# layer has one g_idx parameter, which every shard overwrites: the siblings' g_idx must be identical.
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_g_idx_clashes(g_idx: dict[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """Names of sibling layers that vLLM fuses but whose ``g_idx`` differ (each tuple: one fused layer)."""
    clashes = []
    for n in g_idx:
        parent, _, leaf = n.rpartition(".")
        for group in VLLM_FUSED:
            if leaf != group[0]:
                continue
            names = [f"{parent}.{s}" for s in group if f"{parent}.{s}" in g_idx]
            if any(not torch.equal(g_idx[names[0]], g_idx[o]) for o in names[1:]):
                clashes.append(tuple(names))
    return clashes


def _full_groups(grid: IntegerGrid, in_features: int, group_size: int | None) -> IntegerGrid:
    """Pad the scale/zero tables to the ``ceil(in / group_size)`` groups a GPTQ loader allocates.

    With weak columns the stored base has fewer columns, so possibly fewer groups; the extra
    groups are never referenced by ``g_idx`` and repeat the last real group.
    """
    want = math.ceil(in_features / group_size) if group_size else 1
    have = grid.n_groups
    if have > want:
        raise AssertionError(f"{have} groups for {in_features} columns of group size {group_size}")
    if have == want:
        return grid
    pad = want - have
    scales = torch.cat([grid.scales, grid.scales[:, -1:].expand(-1, pad)], dim=1)
    zeros = torch.cat([grid.zeros, grid.zeros[:, -1:].expand(-1, pad)], dim=1)
    return IntegerGrid(grid.bits, grid.sym, grid.group_size, grid.codes, scales, zeros, grid.g_idx, grid.weak_idx,
                       grid.weak_values, grid.sparse)


def _shift_zero_points(grid: IntegerGrid) -> tuple[IntegerGrid, int]:
    """Move groups with zero point 0 to zero point 1 (every code + 1) where their top code is free.

    ``s * ((q + 1) - (0 + 1)) == s * (q - 0)``: decoded values are unchanged, and GPTQ v1 can store the zero.
    """
    zero0 = grid.zeros == 0  # [out, groups]
    if not bool(zero0.any()):
        return grid, 0
    codes, zeros = grid.codes.clone(), grid.zeros.clone()
    shifted = 0
    for g in torch.nonzero(zero0.any(0)).flatten().tolist():
        cols = grid.g_idx == g
        rows = zero0[:, g]
        if not bool(cols.any()):  # a padding group nobody reads
            zeros[rows, g] = 1
            continue
        fits = rows & (codes[:, cols].amax(dim=1) < grid.maxq)
        sub = codes[:, cols]
        sub[fits] += 1
        codes[:, cols] = sub
        zeros[fits, g] = 1
        shifted += int(fits.sum())
    return IntegerGrid(grid.bits, grid.sym, grid.group_size, codes, grid.scales, zeros, grid.g_idx, grid.weak_idx,
                       grid.weak_values, grid.sparse), shifted


def _wct_version() -> str:
    import wct

    return wct.__version__


__all__ = ["VLLM_FUSED", "VLLM_MAX_LORA_RANKS", "GPTQTarget", "fused_g_idx_clashes", "vllm_max_lora_rank"]

"""``--format gguf``: one ``model.gguf`` for llama.cpp / Ollama / LM Studio, plus ``adapter.gguf`` for weak columns.

Written with the ``gguf`` package's ``GGUFWriter`` and its own tables: tensor names come from
``gguf.TensorNameMap`` (HF name -> ``blk.N.attn_q.weight`` ...), metadata keys from its ``add_*``
methods, the tokenizer from :mod:`wct.exporters.gguf_vocab`.  Only the llama architecture (Llama,
Mistral, SmolLM, TinyLlama ...) is written; other architectures are refused with the dense route named.

Exactness (each tensor recorded, decoded with ``gguf.quants.dequantize``):

* integer grids -> Q4_0 / Q5_0 / Q8_0 blocks, exact wherever 32 consecutive columns share one scale
  (:mod:`wct.exporters.gguf_blocks`); other blocks are requantized to the same type and counted;
* codebooks (NF4/BOF4 ...) -> requantized whole (``gguf_requant``, default Q4_1), error reported;
* sparse outliers: the blocks holding them are requantized from the merged weight (reported);
* weak columns -> ``adapter.gguf``, a llama.cpp LoRA adapter (``llama-cli -m model.gguf --lora
  adapter.gguf``), exact: one rank ``r`` for all layers (zero-padded), ``adapter.lora.alpha = r`` so
  llama.cpp's scale ``alpha / r`` is 1.  With ``gguf_weak="merge"`` they are added into the base
  instead and the blocks holding them requantized (one file, reported);
* norms are F32 (llama.cpp's convention), embeddings and other dense tensors ``dtype``.

llama.cpp applies rotary embeddings to interleaved pairs, transformers to split halves, so the
rows of ``attn_q``/``attn_k`` are permuted exactly as llama.cpp's converter does
(:func:`rope_row_permutation`); rows are independent in every format, so this changes no value.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from wct.nn import QuantLinear

from .base import ExportOptions, ExportTarget, UnsupportedExportError
from .gguf_blocks import QK, REQUANT_TYPES, decode, encode_grid, requantize
from .grid import is_integer_layer, read_integer_grid
from .lora import WeakColumns
from .report import ExportReport
from .source import ExportSource

MODEL_FILE = "model.gguf"
ADAPTER_FILE = "adapter.gguf"
ARCHS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}
_FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
               "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "F32": "ALL_F32"}


def rope_row_permutation(out_features: int, n_head: int) -> torch.Tensor:
    """Row order of llama.cpp's ``LlamaModel.permute``: new row ``i`` is old row ``perm[i]``."""
    rows = torch.arange(out_features)
    return rows.reshape(n_head, 2, out_features // n_head // 2).transpose(1, 2).reshape(out_features)


class GGUFTarget(ExportTarget):
    name = "gguf"
    summary = "GGUF (llama.cpp, Ollama, LM Studio): exact Q4_0/Q5_0/Q8_0 grids, weak columns as a GGUF LoRA"

    def check(self, source: ExportSource, options: ExportOptions) -> None:
        arch = (source.config.get("architectures") or [type(source.model).__name__])[0]
        if arch not in ARCHS:
            raise UnsupportedExportError(
                f"GGUF export writes the llama architecture ({', '.join(sorted(ARCHS))}); this model is {arch}. "
                "Export --format dense and convert that folder with llama.cpp's convert_hf_to_gguf.py"
            )
        rope = source.config.get("rope_parameters") or source.config.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
        if rope_type not in ("default", None):
            raise UnsupportedExportError(
                f"rope type {rope_type!r} needs llama.cpp's rope-frequency tables, which this writer does not produce; "
                "export --format dense and convert it with convert_hf_to_gguf.py"
            )
        from .gguf_vocab import build_vocab

        build_vocab(source.tokenizer_files, int(source.config["vocab_size"]))  # raises for tokenizers we cannot write

    # ------------------------------------------------------------------ writing
    def write(self, source: ExportSource, folder: Path, options: ExportOptions, report: ExportReport,
              progress: bool = True) -> None:
        import gguf

        cfg = source.config
        n_layers, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
        n_kv = int(cfg.get("num_key_value_heads") or n_head)
        names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, n_layers)
        writer = gguf.GGUFWriter(str(folder / MODEL_FILE), "llama")
        self._metadata(writer, source, report)

        types: Counter[str] = Counter()
        weak: list[tuple[str, WeakColumns, torch.Tensor | None]] = []
        for n, m in tqdm(source.quant_layers().items(), desc="gguf: encoding", disable=not progress):
            gname = _gguf_name(names, f"{n}.weight")
            perm = _perm_for(n, m.out_features, n_head, n_kv)
            data, tname, wc = self._layer(n, m, perm, options, report)
            writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[tname])
            types[tname] += 1
            if wc is not None:
                weak.append((gname, wc, perm))
            if m.bias is not None:
                self._dense(writer, report, _gguf_name(names, f"{n}.bias"), f"{n}.bias",
                            _rows(m.bias.detach().float(), perm), "F32")
        for name, t in source.dense_tensors().items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            gname = _gguf_name(names, name)
            perm = _perm_for(name.rsplit(".", 1)[0], t.shape[0], n_head, n_kv) if t.dim() >= 1 else None
            kind = "F32" if t.dim() == 1 else {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[options.dtype]
            self._dense(writer, report, gname, name, _rows(t.detach().float(), perm), kind)
        main = types.most_common(1)[0][0] if types else "F32"
        writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES.get(main, "ALL_F32")]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        if weak:
            r = write_gguf_lora(folder / ADAPTER_FILE, weak, cfg)
            report.notes.append(
                f"weak columns of {len(weak)} layers are in {ADAPTER_FILE} (a llama.cpp LoRA, rank {r} zero-padded, "
                f"alpha {r}: scale 1, exact); run with --lora {ADAPTER_FILE}, the base alone lacks them")
        report.options["gguf"] = {"types": dict(types)}

    def _layer(self, name: str, m: QuantLinear, perm: torch.Tensor | None, options: ExportOptions,
               report: ExportReport) -> tuple[np.ndarray, str, WeakColumns | None]:
        """Encode one packed layer; returns (data, GGML type name, weak columns for the adapter or None)."""
        full = _rows(m.dequantize_weight(torch.float32), perm)  # what wct computes with, in GGUF row order
        cols = m.column_outliers()
        wc = None
        target = full
        if cols is not None and options.gguf_weak == "adapter":
            wc = WeakColumns(name, m.in_features, cols.idx.long(), cols.values)
            target = full - _rows(wc.delta(), perm)  # the base file holds the rest; exact: the base is 0 there
        notes: list[str] = []
        fallback = options.gguf_requant or ("q8_0" if getattr(m.fmt, "bits", 4) > 4 else "q4_1")
        if m.in_features % QK:
            kind = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}[options.dtype]
            data, tname = requantize(target, kind), REQUANT_TYPES[kind]
            notes.append(f"in_features {m.in_features} is not a multiple of {QK}: stored {tname}")
        elif is_integer_layer(m):
            grid = read_integer_grid(m)
            codes, scales, zeros = (_rows(t, perm) for t in (grid.codes, grid.scales, grid.zeros))
            force = torch.zeros(m.out_features, m.in_features // QK, dtype=torch.bool)
            sp = m.sparse_outliers()
            if sp is not None:
                force |= _rows(sp.mask(), perm).reshape(m.out_features, -1, QK).any(-1)
            if cols is not None and options.gguf_weak == "merge":
                force[:, torch.unique(cols.idx.long() // QK)] = True
            alt = None
            if sp is not None:
                alt = _rows(read_integer_grid(m).with_sparse_on_grid()[0].codes, perm)
            enc = encode_grid(codes, scales, zeros, grid.g_idx, target, force, alt_codes=alt)
            data, tname = enc.data, enc.type_name
            if enc.mixed_groups:
                notes.append(f"{enc.mixed_groups}/{enc.total_blocks} blocks span groups of different scales: "
                             "requantized")
            if enc.out_of_range:
                notes.append(f"{enc.out_of_range}/{enc.total_blocks} blocks hold q - z outside {tname}'s range: "
                             "requantized")
            if enc.forced and alt is None:
                notes.append(f"{enc.forced} blocks hold merged weak columns: requantized")
            elif enc.forced:
                what = "sparse outliers" + (" / merged weak columns" if cols is not None and
                                            options.gguf_weak == "merge" else "")
                notes.append(f"{enc.forced} blocks hold {what}: {enc.forced_requantized} requantized, the rest "
                             "kept on the grid with the outliers rounded onto it (whichever is closer)")
            if m.fmt.bits < 4:
                note = f"int{m.fmt.bits} grids are stored in {tname} (exact; GGUF has no {m.fmt.bits}-bit type " \
                       "with a plain fp16 scale, so the file is larger than wct's)"
                if note not in report.notes:
                    report.notes.append(note)
        else:
            tname = REQUANT_TYPES[fallback]
            data = requantize(target, fallback)
            notes.append(f"{m.fmt.name} codebook has no GGUF form: requantized to {tname}")
        decoded = decode(data, tname, tuple(target.shape))
        label = tname + (f" + lora r={wc.k}" if wc is not None else "")
        report.add(name, label, decoded + (_rows(wc.delta(), perm) if wc is not None else 0), full,
                   note="; ".join(notes))
        return data, tname, wc

    @staticmethod
    def _dense(writer, report: ExportReport, gname: str, name: str, t: torch.Tensor, kind: str) -> None:
        """A tensor stored as F32 / F16 / BF16, recorded with what ``gguf`` decodes from it."""
        import gguf

        w = t.detach().float().cpu().numpy()
        if kind == "F32":
            data = w.astype(np.float32)
        elif kind == "F16":
            data = w.astype(np.float16)
        else:
            data = gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[kind] if data.dtype == np.uint8 else None)
        decoded = decode(data, kind, tuple(t.shape) if t.dim() else (1,)).reshape(t.shape)
        report.add(name, kind, decoded, t, note="" if torch.equal(decoded, t.float()) else f"rounded to {kind}")

    @staticmethod
    def _metadata(writer, source: ExportSource, report: ExportReport) -> None:
        from .gguf_vocab import add_tokenizer

        cfg = source.config
        hidden, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or hidden // n_head)
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        writer.add_type("model")
        writer.add_name(str(cfg.get("_name_or_path") or source.name).rstrip("/").split("/")[-1] or "wct-export")
        writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_block_count(int(cfg["num_hidden_layers"]))
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(theta)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        writer.add_vocab_size(int(cfg["vocab_size"]))
        vocab = add_tokenizer(writer, source.tokenizer_files, int(cfg["vocab_size"]))
        report.notes.extend(vocab.notes)


def write_gguf_lora(path: Path, weak: list[tuple[str, WeakColumns, torch.Tensor | None]], cfg: dict) -> int:
    """A llama.cpp LoRA adapter file for the weak columns; returns its (uniform) rank."""
    import gguf

    r = max(wc.k for _, wc, _ in weak)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(r))
    for gname, wc, perm in weak:
        a, b = wc.lora_pair(rank=r, row_perm=perm)
        writer.add_tensor(f"{gname}.lora_a", a.float().numpy())  # [r, in]: ggml ne = (in, r)
        writer.add_tensor(f"{gname}.lora_b", b.float().numpy())  # [out, r]: ggml ne = (r, out)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return r


def _gguf_name(names, hf_name: str) -> str:
    g = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if g is None:
        raise UnsupportedExportError(f"{hf_name} has no llama.cpp tensor name (gguf.TensorNameMap): this llama "
                                     "variant carries tensors llama.cpp does not know; export --format dense")
    return g


def _perm_for(module: str, out_features: int, n_head: int, n_kv: int) -> torch.Tensor | None:
    if module.endswith("self_attn.q_proj"):
        return rope_row_permutation(out_features, n_head)
    if module.endswith("self_attn.k_proj"):
        return rope_row_permutation(out_features, n_kv)
    return None


def _rows(t: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    return t if perm is None else t[perm.to(t.device)]


__all__ = ["ADAPTER_FILE", "ARCHS", "GGUFTarget", "MODEL_FILE", "rope_row_permutation", "write_gguf_lora"]

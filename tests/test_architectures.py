"""Every architecture wct claims, through every step a user takes (the matrix of docs/architectures.md), and GPT-2's
checkpoint round trip.

The cells are computed by ``scripts/architecture_matrix.py`` (the same functions that write the document), one
architecture at a time, cached for the module.  A cell must pass unless it is listed in ``KNOWN_FAILURES`` with a
substring of the error it raises; a listed cell that starts passing fails too, so that fixes are seen and the entry
(and the document: ``python scripts/architecture_matrix.py``) are updated.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import wct
from wct.checkpoint_io import WCTCheckpointError
from wct.nn import QuantLinear

ROOT = Path(__file__).resolve().parents[1]


def _load_matrix():
    name = "architecture_matrix"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


matrix = _load_matrix()

# (arch, step) -> a substring of the error the cell reports today.  Remove an entry when its cell passes.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}
CELLS = [(arch, step) for arch in matrix.ARCHITECTURES for step in matrix.STEPS]
_RESULTS: dict[str, dict] = {}


def cells(arch: str) -> dict:
    if arch not in _RESULTS:
        _RESULTS[arch] = matrix.run_architecture(arch)
    return _RESULTS[arch]


def test_the_matrix_covers_the_architectures_issue_18_lists():
    required = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "opt", "falcon", "gpt_neox",
                "stablelm", "mixtral", "qwen3_moe", "olmoe"}
    assert required <= set(matrix.ARCHITECTURES)
    assert set(matrix.STEPS) >= set("abcdef")
    assert {a for a, _ in KNOWN_FAILURES} <= set(matrix.ARCHITECTURES) and {s for _, s in KNOWN_FAILURES} <= set(matrix.STEPS)


@pytest.mark.parametrize(("arch", "step"), CELLS, ids=[f"{a}-{s}" for a, s in CELLS])
def test_cell(arch, step):
    cell = cells(arch)[step]
    known = KNOWN_FAILURES.get((arch, step))
    if known is None:
        assert cell.ok, f"{arch}, step ({step}) {matrix.STEPS[step]}: {cell.error}"
        return
    assert not cell.ok, (
        f"{arch}, step ({step}) passes now ({cell.note}): remove KNOWN_FAILURES[{(arch, step)!r}] and regenerate "
        f"docs/architectures.md ({matrix.COMMAND})"
    )
    assert known in cell.error, f"{arch}, step ({step}) fails differently than listed: {cell.error}"


def test_the_document_shows_exactly_the_known_failures():
    """docs/architectures.md is the generated table: its ❌ cells are the KNOWN_FAILURES, each with its error."""
    text = (ROOT / "docs" / "architectures.md").read_text(encoding="utf-8")
    assert matrix.COMMAND in text
    steps = list(matrix.STEPS)
    crosses = {}
    for line in text.splitlines():
        m = re.match(r"\| .*?\(`(\w+)`\) \|(.*)\|$", line)
        if not m:
            continue
        for step, value in zip(steps, m.group(2).split(" | ")):
            if "❌" in value:
                crosses[(m.group(1), step)] = value
    assert {a for a, _ in crosses} | set(matrix.ARCHITECTURES) == set(matrix.ARCHITECTURES)
    assert set(crosses) == set(KNOWN_FAILURES), "regenerate docs/architectures.md: " + matrix.COMMAND
    for key, value in crosses.items():
        assert KNOWN_FAILURES[key] in value.replace("\\|", "|") or KNOWN_FAILURES[key][:60] in value


# --- GPT-2: Conv1D layers, a tied lm_head, and an _init_weights that reaches into its children ---------------------
def _tiny_gpt2(tie: bool):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
                     tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg).eval()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt2_checkpoint_round_trip_is_exact(tmp_path, tie):
    """Failed before: transformers 5 runs ``initialize_weights`` over every module after a load, and GPT-2's
    ``_init_weights`` does ``init.normal_(module.c_proj.weight)`` on each attention/MLP: AttributeError on the
    QuantLinear there (the "lm_head.weight MISSING" line of the load report was the report printed mid-failure)."""
    model = _tiny_gpt2(tie)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    wct.quantize_model(model, wct.QuantConfig(method="owq", wbits=4, target_bits=4.3), calibration=calib, progress=False)
    assert sum(m.n_weak for m in model.modules() if isinstance(m, QuantLinear)) > 0
    ref = _logits(model)
    wct.save_pretrained(model, tmp_path / "ckpt")
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"), wct.load_quantized(tmp_path / "ckpt")):
        assert torch.equal(_logits(loaded), ref)
        assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == tie
        # the load-time guard leaves nothing behind: no wrapper, no placeholder weight
        assert not any("_init_weights" in vars(m) for m in loaded.modules())
        assert not any(hasattr(m, "weight") for m in loaded.modules() if isinstance(m, QuantLinear))


@pytest.fixture
def llama_ckpt(tmp_path):
    from conftest import make_tiny_llama

    model = make_tiny_llama()
    wct.quantize_model(model, wct.QuantConfig(method="bof4s"), progress=False)
    wct.save_pretrained(model, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _broken_init(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaPreTrainedModel

    def _init_weights(self, module):
        if isinstance(module, torch.nn.Module) and type(module).__name__ == "LlamaMLP":
            raise AttributeError("'QuantLinear' object has no attribute 'something'")

    monkeypatch.setattr(LlamaPreTrainedModel, "_init_weights", _init_weights)


def test_load_quantized_does_not_blame_intact_files_for_a_failure_inside_transformers(llama_ckpt, monkeypatch):
    """Failed before: any AttributeError inside from_pretrained was reported as 'config.json or the weights are
    corrupt' even when every checksum matched."""
    _broken_init(monkeypatch)
    with pytest.raises(RuntimeError, match="files are intact") as err:
        wct.load_quantized(llama_ckpt)
    msg = str(err.value)
    assert "not a corrupt checkpoint" in msg and "no attribute 'something'" in msg
    assert re.search(r"test_architectures\.py:\d+ in _init_weights", msg)  # where it happened
    assert not isinstance(err.value, WCTCheckpointError)
    assert isinstance(err.value.__cause__, AttributeError)


def test_load_quantized_without_a_verified_manifest_still_suspects_the_files(llama_ckpt, monkeypatch):
    _broken_init(monkeypatch)
    monkeypatch.setenv("WCT_VERIFY_CHECKSUMS", "0")
    with pytest.raises(WCTCheckpointError, match="no verified wct_manifest.json.*corrupt"):
        wct.load_quantized(llama_ckpt)

"""Issue #16, "loud failure instead of silent garbage": loading wct files in a process that never imported wct.

Before: ``AutoModelForCausalLM.from_pretrained(<wct checkpoint>)`` only logged "Unknown quantization
type ... we will skip the quantization" and returned a model with randomly initialised Linears, and
``PeftModel.from_pretrained(base, <WCT adapter>)`` died with a bare ``KeyError: 'WCT'``.  Now both
raise an error that names the fix (``import wct``), and the same loads after ``import wct`` give
the exact logits.

The artifacts are built here (wct imported); every load under test runs in a fresh interpreter
(``subprocess``) that imports only torch/transformers/peft, and checks that it never imported wct.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_tiny_llama
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import wct  # noqa: F401  (registers quant_method="wct" and the WCT PEFT method in *this* process)
import wct.integrations.transformers as hf
from wct.checkpoint_io import MANIFEST
from wct.quantize import QuantConfig
from wct.tuners.wct import WCT_PEFT_TYPE, WCT_STORED_PEFT_TYPE, WCTConfig

CAL = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An OWQ checkpoint (saved by wct) and a briefly trained WCT adapter on it, with reference logits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("no_import")
    model = wct.quantize_model(make_tiny_llama(), QuantConfig(method="owq", wbits=4, target_bits=4.25),
                               calibration=CAL, progress=False)
    ckpt = wct.save_pretrained(model, root / "ckpt")
    base = AutoModelForCausalLM.from_pretrained(ckpt)  # so that the adapter records the checkpoint as its base
    pm = get_peft_model(base, WCTConfig(task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for _ in range(3):
        pm(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    adapter = wct.save_pretrained(pm, root / "adapter")
    out = {"ckpt": ckpt, "adapter": adapter, "base_logits": logits(model), "tuned_logits": logits(pm), "root": root}
    assert not torch.equal(out["base_logits"], out["tuned_logits"])  # the adapter really changes the model
    yield out
    torch.set_num_threads(threads)


def run_fresh(body: str, *args: str, imports_wct: bool = False) -> subprocess.CompletedProcess:
    """``body`` in a new interpreter (offline, one thread); unless ``imports_wct``, it must never import wct."""
    guard = "" if imports_wct else (
        "\nfinally:\n"
        "    leaked = sorted(m for m in sys.modules if m == 'wct' or m.startswith('wct.'))\n"
        "    if leaked:\n"
        "        raise SystemExit(f'TEST BUG: the fresh process imported {leaked}')\n"
    )
    script = "import sys, torch\ntorch.set_num_threads(1)\ntry:\n" + textwrap.indent(textwrap.dedent(body), "    ")
    script += guard or "\nfinally:\n    pass\n"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-P", "-c", script, *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=os.path.dirname(os.path.abspath(__file__)))


# --- without `import wct`: refused, naming the fix -------------------------------------------------------------------
REFUSED = {
    # the packed checkpoint itself: transformers used to return random Linears here
    "AutoModelForCausalLM(checkpoint)": """
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
    """,
    "LlamaForCausalLM(checkpoint, dtype=bf16)": """
        from transformers import LlamaForCausalLM
        LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, ignore_mismatched_sizes=True)
    """,
    # a WCT adapter on a plain (never quantized) base: PEFT used to raise a bare KeyError: 'WCT'
    "PeftModel(adapter)": """
        from peft import PeftModel
        from transformers import AutoConfig, AutoModelForCausalLM
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
        PeftModel.from_pretrained(base, sys.argv[2])
    """,
    "AutoPeftModelForCausalLM(adapter)": """
        from peft import AutoPeftModelForCausalLM
        AutoPeftModelForCausalLM.from_pretrained(sys.argv[2])
    """,
    # transformers' own adapter loading: it loads the base named in adapter_config.json first
    "AutoModelForCausalLM(adapter dir)": """
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(sys.argv[2])
    """,
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_load_without_import_wct_fails_naming_the_fix(built, case):
    proc = run_fresh(textwrap.dedent(REFUSED[case]) + "print('LOADED')\n", str(built["ckpt"]), str(built["adapter"]))
    assert "TEST BUG" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode != 0 and "LOADED" not in proc.stdout, f"{case} returned a model:\n{proc.stderr[-2000:]}"
    last = proc.stderr.strip().splitlines()[-1]  # the exception line itself, not a log line before it
    assert "import wct" in last and "pip install wct" in last, proc.stderr[-2000:]


# --- with `import wct` first: the same loads work, bit for bit -------------------------------------------------------
LOADED = {
    "checkpoint": ("""
        import wct
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    """, "base_logits"),
    "checkpoint + adapter": ("""
        import wct
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2])
    """, "tuned_logits"),
}


@pytest.mark.parametrize("case", list(LOADED))
def test_same_load_after_import_wct_matches(built, case, tmp_path):
    body, ref = LOADED[case]
    out = tmp_path / "logits.pt"
    body += f"""
        with torch.no_grad():
            torch.save(model(input_ids=torch.tensor({IDS.tolist()})).logits, sys.argv[3])
    """
    proc = run_fresh(body, str(built["ckpt"]), str(built["adapter"]), str(out), imports_wct=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(out), built[ref])


# --- what is on disk, and compatibility (in this process, wct imported) ----------------------------------------------
def _copy_without_manifest(src, dst) -> str:
    """Edited copies drop the checksum manifest (as a third-party edit would)."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, MANIFEST))
    return str(dst)


def _edit_json(path: str, fn) -> None:
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


def test_guard_is_on_disk_and_gone_after_loading(built, tmp_path):
    cfg = json.load(open(os.path.join(built["ckpt"], "config.json")))
    assert cfg[hf.LOAD_GUARD_FIELD] == hf.LOAD_GUARD
    model = AutoModelForCausalLM.from_pretrained(built["ckpt"])
    assert not hasattr(model.config, hf.LOAD_GUARD_FIELD)  # the quantizer dropped it: the weights came from the default file
    again = wct.save_pretrained(model, tmp_path / "resaved")
    assert json.load(open(os.path.join(again, "config.json")))[hf.LOAD_GUARD_FIELD] == hf.LOAD_GUARD
    adapter_cfg = json.load(open(os.path.join(built["adapter"], "adapter_config.json")))
    assert adapter_cfg["peft_type"] == WCT_STORED_PEFT_TYPE and "import wct" in WCT_STORED_PEFT_TYPE


def test_checkpoint_without_guard_from_older_wct_still_loads(built, tmp_path):
    old = _copy_without_manifest(built["ckpt"], tmp_path / "old")
    _edit_json(os.path.join(old, "config.json"), lambda d: d.pop(hf.LOAD_GUARD_FIELD))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(old)), built["base_logits"])
    assert torch.equal(logits(wct.load_quantized(old)), built["base_logits"])


def test_adapter_with_plain_wct_peft_type_from_older_wct_still_loads(built, tmp_path):
    old = _copy_without_manifest(built["adapter"], tmp_path / "old_adapter")
    _edit_json(os.path.join(old, "adapter_config.json"), lambda d: d.update(peft_type="WCT"))
    for load in (lambda b: PeftModel.from_pretrained(b, old), lambda b: wct.load_adapter(b, old)):
        pm = load(AutoModelForCausalLM.from_pretrained(built["ckpt"]))
        assert pm.peft_config["default"].peft_type == WCT_PEFT_TYPE
        assert torch.equal(logits(pm), built["tuned_logits"])


def test_only_the_guard_is_dropped_from_a_config():
    cfg = make_tiny_llama().config
    cfg.transformers_weights = "custom.safetensors"  # a real explicit weights file stays
    assert hf.drop_load_guard(cfg).transformers_weights == "custom.safetensors"
    cfg.transformers_weights = hf.LOAD_GUARD
    assert not hasattr(hf.drop_load_guard(cfg), "transformers_weights")

"""Bounded fuzzing of what users load and save: ``make fuzz`` (a few minutes), a fixed-seed short run on CI.

Targets, each printed as a row of figures:

* ``checkpoint``: a packed wct checkpoint (tiny Llama, OWQ weak columns in some layers, GWQ CSR
  outliers in others) is copied and mutated — bit flips in the safetensors header and data,
  truncation, inserted/deleted bytes, edited header fields (shape, dtype, offsets), edited
  ``config.json`` fields (bits, group size, layer specs, column indices), files swapped with
  another checkpoint, files deleted — then loaded with ``wct.load_quantized``.
* ``adapter``: the same for a WCT adapter folder loaded with ``wct.load_adapter``.
* ``structure-only``: the checkpoint mutations again with ``WCT_VERIFY_CHECKSUMS=0``, to show what
  the structural checks alone catch (informational: a flipped bit inside an fp16 value is a valid
  number, so without the checksum some mutations *must* load as garbage).
* ``interrupted-save``: a subprocess saves checkpoints in a loop over an existing one and is
  SIGKILLed at a random moment; the path must still hold a complete, verified copy.
* ``properties``: the hypothesis property tests (``tests/test_properties.py``, and the hypothesis-driven loader
  fuzz in ``tests/test_integrity.py``) with a larger budget.

Every load runs in a child process, so a segfault or an abort is counted (``crash``) instead of
ending the run.  Outcomes: ``error`` (a ValueError/OSError/RuntimeError/MemoryError naming the
problem), ``intact`` (loaded, and the logits equal the original's: the mutation touched nothing
that matters, e.g. JSON whitespace), ``garbage`` (loaded, logits differ, no error), ``crash``
(any other exception type, or the child died).  With checksums on, ``garbage`` and ``crash``
must be 0, and every interrupted save must leave a loadable copy (``lost`` = 0).

    python scripts/fuzz.py                      # make fuzz: ~3-5 minutes
    python scripts/fuzz.py --quick --seed 0     # what CI runs (tests/test_fuzz.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLEAR_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)
PROBE = [[1, 5, 9, 17, 33, 65, 2, 3, 4, 7, 11, 13]]


# ---------------------------------------------------------------------------------------------------------------------
# fixtures (built once per run, in a temporary folder)
# ---------------------------------------------------------------------------------------------------------------------
def build_model(seed: int, method: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import wct

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(seed))
    qcfg = {"owq": wct.QuantConfig(method="owq", wbits=3, target_bits=3.5),
            "gwq": wct.QuantConfig(method="gwq", wbits=4, outlier_ratio=0.02),
            "bof4s": wct.QuantConfig(method="bof4s", block_size=64)}[method]
    wct.quantize_model(model, qcfg, calibration=calib, progress=False)
    return model


def build_fixtures(root: Path, seed: int) -> dict[str, str]:
    """Two checkpoints (OWQ and GWQ, same architecture) and one WCT adapter, plus reference logits."""
    import torch
    from peft import get_peft_model
    from safetensors.torch import save_file

    import wct

    out = {}
    for name, method in (("ckpt_owq", "owq"), ("ckpt_gwq", "gwq")):
        m = build_model(seed, method)
        wct.save_pretrained(m, root / name)
        with torch.no_grad():
            save_file({"logits": m(torch.tensor(PROBE)).logits}, root / f"{name}.logits.safetensors")
        out[name] = str(root / name)
    base = build_model(seed, "owq")
    peft_model = get_peft_model(base, wct.WCTConfig(trainable="weak_columns"))
    with torch.no_grad():
        for _name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    wct.save_pretrained(peft_model, root / "adapter")
    with torch.no_grad():
        save_file({"logits": peft_model(torch.tensor(PROBE)).logits}, root / "adapter.logits.safetensors")
    out["adapter"] = str(root / "adapter")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------------------------------
def _st_layout(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n])


def _rewrite_header(path: Path, edit) -> str:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    what = edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    return what


def mutate(folder: Path, rng: random.Random, other: Path | None, weights: str) -> str:
    """Apply one random mutation to the copy in ``folder``; returns a description."""
    wfile = folder / weights
    kinds = ["flip_data", "flip_header", "truncate", "insert", "delete", "header_shape", "header_dtype",
             "header_offsets", "config_value", "config_spec", "swap_file", "delete_file", "flip_config", "zero_tail"]
    kind = rng.choice(kinds)
    raw = bytearray(wfile.read_bytes())
    n, header = _st_layout(wfile)
    tensors = [k for k in header if k != "__metadata__"]
    if kind == "flip_data":
        i = rng.randrange(8 + n, len(raw))
        raw[i] ^= 1 << rng.randrange(8)
        wfile.write_bytes(bytes(raw))
        return f"{kind} byte {i}"
    if kind == "flip_header":
        i = rng.randrange(0, 8 + n)
        raw[i] ^= 1 << rng.randrange(8)
        wfile.write_bytes(bytes(raw))
        return f"{kind} byte {i}"
    if kind == "truncate":
        cut = rng.randrange(0, len(raw))
        wfile.write_bytes(bytes(raw[:cut]))
        return f"{kind} to {cut}"
    if kind == "insert":
        i = rng.randrange(0, len(raw))
        wfile.write_bytes(bytes(raw[:i]) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + bytes(raw[i:]))
        return f"{kind} at {i}"
    if kind == "delete":
        i = rng.randrange(0, len(raw))
        wfile.write_bytes(bytes(raw[:i]) + bytes(raw[i + rng.randint(1, 16):]))
        return f"{kind} at {i}"
    if kind == "zero_tail":
        i = rng.randrange(8 + n, len(raw))
        wfile.write_bytes(bytes(raw[:i]) + bytes(len(raw) - i))
        return f"{kind} from {i}"
    if kind.startswith("header_"):
        key = rng.choice(tensors)

        def edit(h):
            info = h[key]
            if kind == "header_shape":
                j = rng.randrange(len(info["shape"])) if info["shape"] else None
                if j is None:
                    info["shape"] = [1]
                else:
                    info["shape"][j] = rng.choice([0, 1, info["shape"][j] * 2, 10**12, info["shape"][j] + 1])
            elif kind == "header_dtype":
                info["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "U8", "I8", "I16", "I32", "I64", "BOOL"])
            else:
                a, b = info["data_offsets"]
                info["data_offsets"] = rng.choice([[a, b + 2], [a + 1, b], [0, b - a], [a, 10**15], [b, a]])
            return f"{kind} {key}"
        return _rewrite_header(wfile, edit)
    cfg_name = "config.json" if (folder / "config.json").exists() else "adapter_config.json"
    cfg_file = folder / cfg_name
    if kind == "flip_config":
        raw = bytearray(cfg_file.read_bytes())
        i = rng.randrange(len(raw))
        raw[i] ^= 1 << rng.randrange(8)
        cfg_file.write_bytes(bytes(raw))
        return f"{kind} byte {i}"
    if kind in ("config_value", "config_spec"):
        cfg = json.loads(cfg_file.read_text())
        paths = list(_leaves(cfg))
        if kind == "config_spec" and "quantization_config" in cfg:
            paths = [p for p in paths if p[0] == "quantization_config"] or paths
        p = rng.choice(paths)
        _set_leaf(cfg, p, _perturb(_get_leaf(cfg, p), rng))
        cfg_file.write_text(json.dumps(cfg))
        return f"{kind} {'.'.join(map(str, p))}"
    if kind == "swap_file" and other is not None:
        src = other / rng.choice([weights, cfg_name])
        if src.exists():
            shutil.copy(src, folder / src.name)
            return f"{kind} {src.name} from {other.name}"
    victim = rng.choice([weights, cfg_name])
    (folder / victim).unlink()
    return f"delete_file {victim}"


def _leaves(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from _leaves(v, prefix + (i,))
    else:
        yield prefix


def _get_leaf(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _set_leaf(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _perturb(v, rng: random.Random):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return rng.choice([v + 1, v - 1, 0, -1, v * 2, 2**40, None])
    if isinstance(v, float):
        return rng.choice([v * 2, -v, 0.0, float("1e300"), None])
    if isinstance(v, str):
        return rng.choice(["", v + "x", "float64", "int3", None, 3])
    return rng.choice([None, 0, "x", [], {}])


# ---------------------------------------------------------------------------------------------------------------------
# the child process: load mutated folders, classify each
# ---------------------------------------------------------------------------------------------------------------------
def child_main(job_file: str) -> int:
    import torch

    import wct

    job = json.loads(Path(job_file).read_text())
    from safetensors.torch import load_file

    ref = load_file(job["reference_logits"])["logits"]
    base_dir = job.get("adapter_base")
    results = open(job["results"], "a", buffering=1)
    for item in job["items"]:
        t0 = time.time()
        rec = {"i": item["i"], "what": item["what"]}
        try:
            if base_dir:
                base = wct.load_quantized(base_dir)
                model = wct.load_adapter(base, item["path"])
            else:
                model = wct.load_quantized(item["path"])
            with torch.no_grad():
                out = model(torch.tensor(PROBE)).logits
            same = out.shape == ref.shape and bool(torch.equal(out, ref))
            rec["outcome"] = "intact" if same else "garbage"
        except CLEAR_ERRORS as e:
            msg = str(e)
            rec.update(outcome="error", error=f"{type(e).__name__}: {msg[:300]}",
                       names_where=item["path"] in msg or "model." in msg or "layers." in msg)
        except Exception as e:  # noqa: BLE001 - anything else is an unhandled internal error: a crash
            rec.update(outcome="crash", error=f"{type(e).__name__}: {str(e)[:300]}")
        rec["seconds"] = round(time.time() - t0, 3)
        results.write(json.dumps(rec) + "\n")
    return 0


def run_loads(items: list[dict], reference_logits: str, work: Path, env_extra: dict, adapter_base: str | None = None,
              timeout: float = 600.0) -> list[dict]:
    """Load every mutated folder in child processes; a child that dies is restarted after the item it died on."""
    results_file = work / f"results-{time.time_ns()}.jsonl"
    remaining = list(items)
    done: dict[int, dict] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    while remaining:
        job = work / f"job-{time.time_ns()}.json"
        job.write_text(json.dumps({"items": remaining, "reference_logits": reference_logits, "results": str(results_file),
                                   "adapter_base": adapter_base}))
        proc = subprocess.run([sys.executable, __file__, "--child", str(job)], env=env, timeout=timeout,
                              capture_output=True, text=True)
        for line in results_file.read_text().splitlines() if results_file.exists() else []:
            rec = json.loads(line)
            done[rec["i"]] = rec
        remaining = [it for it in remaining if it["i"] not in done]
        if remaining and proc.returncode != 0:
            dead = remaining.pop(0)
            done[dead["i"]] = {"i": dead["i"], "what": dead["what"], "outcome": "crash",
                               "error": f"child process died (exit {proc.returncode}): {proc.stderr[-300:]}"}
        elif remaining:  # the child exited cleanly without finishing: should not happen
            raise RuntimeError(f"fuzz child stopped early: {proc.stderr[-2000:]}")
    return [done[it["i"]] for it in items]


def fuzz_folder(src: str, other: str | None, weights: str, n: int, rng: random.Random, work: Path, reference: str,
                env_extra: dict | None = None, adapter_base: str | None = None) -> list[dict]:
    items = []
    for i in range(n):
        dst = work / f"m{i:05d}"
        shutil.copytree(src, dst)
        what = mutate(dst, rng, Path(other) if other else None, weights)
        items.append({"i": i, "path": str(dst), "what": what})
    try:
        return run_loads(items, reference, work, env_extra or {}, adapter_base=adapter_base)
    finally:
        for it in items:
            shutil.rmtree(it["path"], ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------------
# interrupted saves
# ---------------------------------------------------------------------------------------------------------------------
SAVER = r"""
import sys, torch, wct
sys.path.insert(0, {root!r})
from scripts.fuzz import build_model
models = [build_model(s, "owq") for s in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    wct.save_pretrained(models[i % 2], {out!r}, overwrite=True)
    i += 1
"""


def interrupted_saves(n: int, rng: random.Random, work: Path) -> dict:
    """Kill a looping saver at random moments; the target must always hold one complete, verified copy."""
    import torch

    import wct

    refs = []
    for s in (1, 2):
        with torch.no_grad():
            refs.append(build_model(s, "owq")(torch.tensor(PROBE)).logits)
    out = work / "target"
    wct.save_pretrained(build_model(1, "owq"), out, overwrite=True)  # the good copy the user has
    lost, leftovers, times = 0, 0, []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for _ in range(n):
        code = SAVER.format(root=str(ROOT), out=str(out))
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        times.append(delay)
        try:
            model = wct.load_quantized(out)
            with torch.no_grad():
                logits = model(torch.tensor(PROBE)).logits
            if not any(torch.equal(logits, r) for r in refs):
                lost += 1
        except Exception:  # noqa: BLE001 - any failure to load the path is lost data
            lost += 1
        leftovers += sum(1 for p in work.iterdir() if p.name.startswith(".target.tmp-"))
    wct.save_pretrained(build_model(2, "owq"), out, overwrite=True)  # the next save sweeps what killed ones left
    remaining = sum(1 for p in work.iterdir() if p.name.startswith((".target.tmp-", ".target.old-")))
    return {"target": "interrupted-save", "tried": n, "lost": lost, "temp_folders_left_by_kills": leftovers,
            "temp_folders_after_next_save": remaining}


# ---------------------------------------------------------------------------------------------------------------------
# property tests
# ---------------------------------------------------------------------------------------------------------------------
def property_tests(examples: int, seed: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WCT_FUZZ_EXAMPLES": str(examples)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_properties.py"),
                           str(ROOT / "tests/test_integrity.py") + "::test_hypothesis_fuzz_of_the_checkpoint_loader",
                           "--hypothesis-show-statistics", f"--hypothesis-seed={seed}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    import re

    # hypothesis >= 6.1xx prints "300 passing, 0 failing, and 0 invalid test cases"; older: "300 passing examples"
    passing = sum(int(m) for m in re.findall(r"(\d+) passing\b", proc.stdout))
    failing = sum(int(m) for m in re.findall(r"(\d+) failing\b", proc.stdout))
    tests = len(re.findall(r"^tests/\S+::\S+:$", proc.stdout, flags=re.M))
    return {"target": "properties", "tests": tests, "tried": passing + failing, "failing": failing,
            "pytest_exit": proc.returncode, "seconds": round(time.time() - t0, 1),
            "tail": proc.stdout[-1500:] if proc.returncode else ""}


# ---------------------------------------------------------------------------------------------------------------------
def summarize(target: str, recs: list[dict]) -> dict:
    out = {"target": target, "tried": len(recs)}
    for k in ("error", "intact", "garbage", "crash"):
        out[k] = sum(r["outcome"] == k for r in recs)
    out["errors_naming_file_or_layer"] = sum(bool(r.get("names_where")) for r in recs if r["outcome"] == "error")
    out["examples"] = ([r for r in recs if r["outcome"] == "crash"] + [r for r in recs if r["outcome"] == "garbage"])[:8]
    out["intact_mutations"] = [r["what"] for r in recs if r["outcome"] == "intact"][:5]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="the short fixed-budget run CI uses")
    ap.add_argument("--checkpoints", type=int, default=None, help="mutated checkpoints to load")
    ap.add_argument("--adapters", type=int, default=None)
    ap.add_argument("--kills", type=int, default=None, help="interrupted saves to simulate")
    ap.add_argument("--examples", type=int, default=None, help="hypothesis examples per property test")
    ap.add_argument("--no-properties", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child)
    n_ck = args.checkpoints or (40 if args.quick else 400)
    n_ad = args.adapters or (15 if args.quick else 150)
    n_kill = args.kills or (3 if args.quick else 25)
    n_ex = args.examples or (10 if args.quick else 300)
    rng = random.Random(args.seed)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    rows = []
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="wct-fuzz-") as tmp:
        work = Path(tmp)
        fx = build_fixtures(work / "fixtures", args.seed)
        muts = work / "mutants"
        muts.mkdir()
        for target, src, other, weights, n, env, base in (
            ("checkpoint", fx["ckpt_owq"], fx["ckpt_gwq"], "model.safetensors", n_ck, {}, None),
            ("adapter", fx["adapter"], None, "adapter_model.safetensors", n_ad, {}, fx["ckpt_owq"]),
            ("structure-only", fx["ckpt_gwq"], fx["ckpt_owq"], "model.safetensors", max(n_ck // 2, 10),
             {"WCT_VERIFY_CHECKSUMS": "0"}, None),
        ):
            t0 = time.time()
            ref = str(Path(src).with_name(Path(src).name + ".logits.safetensors"))
            recs = fuzz_folder(src, other, weights, n, rng, muts, ref, env_extra=env, adapter_base=base)
            row = summarize(target, recs)
            row["seconds"] = round(time.time() - t0, 1)
            row["sample_errors"] = sorted({r.get("error", "")[:160] for r in recs if r["outcome"] == "error"})[:4]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "sample_errors"}), flush=True)
        t0 = time.time()
        kill_dir = work / "kills"
        kill_dir.mkdir()
        row = interrupted_saves(n_kill, rng, kill_dir)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_properties:
        rows.append(property_tests(n_ex, args.seed))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "tail"}), flush=True)
    print()
    print(f"fuzz summary (seed {args.seed}, {time.time() - t_start:.0f} s)")
    print("| target | tried | clear error (naming the file or layer) | intact | silent garbage | crash | lost data |")
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for r in rows:
        if r["target"] == "interrupted-save":
            print(f"| interrupted save (SIGKILL at a random moment) | {r['tried']} | – | {r['tried'] - r['lost']} | – | – | "
                  f"{r['lost']} |")
            bad += r["lost"] + r["temp_folders_after_next_save"]
        elif r["target"] == "properties":
            print(f"| property tests ({r['tests']} tests) | {r['tried']} | – | – | – | {r['failing']} | – |")
            bad += r["failing"] + (r["pytest_exit"] != 0)
            if r["pytest_exit"]:
                print(r["tail"])
        else:
            informational = r["target"] == "structure-only"
            print(f"| {r['target']}{' (checksums off; informational)' if informational else ''} | {r['tried']} | "
                  f"{r['error']} ({r['errors_naming_file_or_layer']}) | {r['intact']} | {r['garbage']} | {r['crash']} | – |")
            bad += r["crash"] + (0 if informational else r["garbage"])
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1) + "\n")
    print("\nresult:", "OK (no crash, no silent garbage, no lost data)" if bad == 0 else f"FAILED ({bad} bad outcomes)")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

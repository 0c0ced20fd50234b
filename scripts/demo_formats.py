"""``make demo-formats``: the storage formats side by side on the embedded SmolLM2-135M-Instruct, offline.

Quantizes the model with BOF4-S and NF4 (block 64) and prints bits per weight,
storage and held-out perplexity next to the unquantized model.

Held-out text: WikiText-2 ``test.txt`` when the development data sits beside
the project (``../shared/data``), otherwise text the project generates itself
(the built-in instruction tasks rendered through the chat template), so a fresh
user needs no download.  A script, not part of the installed library: ``python scripts/demo_formats.py --help``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # benchlib beside this file, also when loaded by path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import peak_rss_mb  # noqa: E402

SHARED_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "test.txt"


def heldout_tokens(tok) -> tuple[torch.Tensor, str]:
    from wct.data import load_token_stream

    if SHARED_TEST.exists():
        return load_token_stream(str(SHARED_TEST), tok), "WikiText-2 test"
    from wct.data.tasks import make_tasks, to_messages

    text = "\n".join(tok.apply_chat_template(to_messages(ex), tokenize=False) for ex in make_tasks(400, seed=12345))
    return load_token_stream(text, tok), "generated instruction tasks"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")
    ap.add_argument("--formats", default="nf4,bof4s")
    args = ap.parse_args(argv)

    import wct
    from wct.eval import perplexity
    from wct.models import load_model

    torch.manual_seed(0)
    t0 = time.time()
    print("[1/3] loading the embedded SmolLM2-135M-Instruct ...", flush=True)
    base, tok = load_model(None)
    stream, source = heldout_tokens(tok)
    print(f"[2/3] held-out text: {source}, {args.windows} windows x 512 tokens", flush=True)
    rows = []
    n_lin = sum(m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in n)
    ppl = perplexity(base, stream, seq_len=512, n_windows=args.windows, batch_size=4)
    rows.append(("fp32", 32.0, n_lin * 4 / 2**20, ppl, 0.0))
    for name in args.formats.split(","):
        print(f"[3/3] quantizing with {name} ...", flush=True)
        model = copy.deepcopy(base)
        t = time.time()
        wct.quantize_model(model, wct.QuantConfig(method=name, block_size=64))
        secs = time.time() - t
        bits = wct.model_bits(model)
        ppl = perplexity(model, stream, seq_len=512, n_windows=args.windows, batch_size=4)
        rows.append((name, bits["bits_per_weight"], bits["nbytes"] / 2**20, ppl, secs))
        del model
    print()
    print(f"SmolLM2-135M-Instruct, decoder Linear layers ({n_lin / 1e6:.1f} M weights); held-out: {source}")
    print(f"{'model':8s} {'bits/weight':>12s} {'storage MB':>11s} {'perplexity':>11s} {'quantize s':>11s}")
    for name, b, mb, p, s in rows:
        print(f"{name:8s} {b:12.3f} {mb:11.2f} {p:11.2f} {s:11.1f}")
    print("\nNote: this model was published as Q4_1, so its 'fp32' weights already sit on a 4-bit grid;")
    print("4-bit rows look better here than they would on the original bf16 weights.")
    print(f"total {time.time() - t0:.0f} s, peak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

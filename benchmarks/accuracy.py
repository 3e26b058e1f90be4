"""Accuracy of ftq's int8 quantizers on the bundled SmolLM2-135M.

Reproduces the table under "## Accuracy" in benchmarks/RESULTS.md:

    python benchmarks/accuracy.py --windows 4 --calibration 4 --qat-steps 30 --methods '...'

Calibration and QAT fine-tuning use the training part of tinyshakespeare
(../shared/data/tinyshakespeare.txt); perplexity is measured on its held-out
last 10 % and on the held-out tail of the bundled English sample
(plugins/data/sample.txt), neither ever seen by calibration or training.
Window 512 tokens.  Prefill: median ms of a 1×256 forward; decode: greedy
tokens/s with a KV cache.  One model load per process; each method quantizes
its own copy.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

#: method label -> (quantizer, options, is-QAT)
METHODS = {
    "dynamic": ("dynamic", {}, False),
    "dynamic sq0.5": ("dynamic", {"smoothquant_alpha": 0.5}, False),
    "dynamic budget3": ("dynamic", {"ppl_budget": 3.0}, False),
    "dynamic sq0.5 budget3": ("dynamic", {"smoothquant_alpha": 0.5, "ppl_budget": 3.0}, False),
    "static ftq": ("static", {"smoothquant_alpha": None, "ppl_budget": None}, False),
    "static ftq sq0.5": ("static", {"ppl_budget": None}, False),
    "static ftq sq0.5 budget3 (default)": ("static", {}, False),
    "static ftq sq0.5 histogram": ("static", {"ppl_budget": None, "observer": "histogram"}, False),
    "static torch-ao x86 sq0.5": ("static", {"backend": "torch-ao", "ppl_budget": None}, False),
    "static torch-ao x86 sq0.5 budget3": ("static", {"backend": "torch-ao"}, False),
    "static torch-ao fbgemm sq0.5": ("static", {"backend": "torch-ao", "engine": "fbgemm", "ppl_budget": None}, False),
    "static torch-ao qnnpack sq0.5": ("static", {"backend": "torch-ao", "engine": "qnnpack", "ppl_budget": None}, False),
    "qat fbgemm sq0.5": ("qat", {"engine": "fbgemm", "freeze_observers_after": 20}, True),
    "qat qnnpack sq0.5": ("qat", {"engine": "qnnpack", "freeze_observers_after": 20}, True),
}


def build_data(tokenizer, windows: int):
    from ftq_core.plugins import get_plugins

    dataset = get_plugins().get("dataset", "text")
    shakespeare = dataset.create(dataset.make_config({"path": str(SHAKESPEARE), "block_size": 512})).build(tokenizer)
    sample = dataset.create(dataset.make_config({"block_size": 512, "eval_fraction": 0.2})).build(tokenizer)
    return shakespeare, sample


def quantize_one(float_model, method: str, splits, args):
    from ftq_core.pipeline import calibrate
    from ftq_core.plugins import get_plugins

    plugins = get_plugins()
    name, options, qat = METHODS[method]
    component = plugins.get("quantizer", name)
    quantizer = component.create(component.make_config(options))
    model = quantizer.prepare(copy.deepcopy(float_model))
    if quantizer.needs_calibration:
        calibrate(model, splits.train, batches=args.calibration, progress=False)
    if qat:
        model = quantizer.on_calibrated(model) if hasattr(quantizer, "on_calibrated") else model
        trainer = plugins.get("trainer", "causal-lm")
        config = trainer.make_config(
            {"max_steps": args.qat_steps, "batch_size": 1, "lr": 1e-5, "warmup_steps": 5, "checkpoint_every": 0, "progress": False}
        )
        trainer.create(config).train(model, splits, checkpoint_dir=None, resume=False, on_step=quantizer.on_train_step)
    model = quantizer.convert(model)
    return model, quantizer.layer_report(model)


def measure(model, label, evals, args) -> dict:
    from ftq_core.evaluation import decode_tokens_per_second, perplexity, prefill_ms

    row = {"method": label}
    for key, blocks in evals.items():
        row[key] = perplexity(model, blocks, max_blocks=args.windows)[0]
    if args.latency:
        row["prefill_ms"] = prefill_ms(model, tokens=256, repeats=3)
        row["decode_tok_s"] = decode_tokens_per_second(model, new_tokens=32, repeats=3)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of method labels")
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens per text")
    parser.add_argument("--calibration", type=int, default=8, help="calibration blocks (tinyshakespeare train part)")
    parser.add_argument("--qat-steps", type=int, default=30, help="QAT fine-tune steps (batch 1 × 512)")
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--json", type=Path, help="write rows as JSON here")
    args = parser.parse_args(argv)
    if not SHAKESPEARE.is_file():
        print(f"needs {SHAKESPEARE}", file=sys.stderr)
        return 2
    import torch

    from ftq_core.models import load_model

    loaded = load_model("smollm2")
    shakespeare, sample = build_data(loaded.tokenizer, args.windows)
    evals = {"shakespeare": shakespeare.eval, "sample": sample.eval}
    rows = [measure(loaded.model, "fp32", evals, args)]
    print(json.dumps(rows[-1]), flush=True)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        started = time.perf_counter()
        model, layers = quantize_one(loaded.model, method, shakespeare, args)
        row = measure(model, method, evals, args)
        row["quantize_s"] = time.perf_counter() - started
        row["layers_int8"] = sum(layer.quantized for layer in layers)
        row["kept_float"] = {l.name: l.reason for l in layers if not l.quantized and l.reason.startswith("sensitivity")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(), "args": vars(args)}, indent=2, default=str))
    return 0


def table(rows, args) -> str:
    base = rows[0]
    lines = [
        f"| method | ppl tinyshakespeare | Δ | ppl sample | Δ | prefill ms (1×256) | decode tok/s | int8 layers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        d1 = 100 * (row["shakespeare"] / base["shakespeare"] - 1)
        d2 = 100 * (row["sample"] / base["sample"] - 1)
        lines.append(
            f"| {row['method']} | {row['shakespeare']:.2f} | {d1:+.1f}% | {row['sample']:.3f} | {d2:+.1f}% | "
            f"{row.get('prefill_ms', float('nan')):.0f} | {row.get('decode_tok_s', float('nan')):.1f} | {row.get('layers_int8', '—')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

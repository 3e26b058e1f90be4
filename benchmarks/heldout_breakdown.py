"""Where an int8 method's loss on held-out text comes from: one group of layers quantized at a time.

    python benchmarks/heldout_breakdown.py [--method dynamic] [--by type|layer|both] [--windows 4]

For each group -- a projection type (``q_proj`` ... ``down_proj``, the head,
the embeddings) or a decoder layer -- the method quantizes only that group
(every other layer stays float through ``keep_float``) and perplexity is
measured on the held-out texts of ``benchmarks/heldout_accuracy.py``
(drama, code, legal: never used for calibration) and the bundled sample's
tail.  Each row's Δ is that group's share of the gap on its own; the last
row is the whole method.  Calibration, where the method has any, is on the
bundled sample, as in ``heldout_accuracy.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens")


def groups(layer_count: int, by: str) -> dict[str, list[str]]:
    """Group label -> the ``keep_float`` patterns that leave only that group to the quantizer."""
    out = {}
    if by in ("type", "both"):
        for kind in PROJECTIONS:
            out[kind] = [other for other in PROJECTIONS if other != kind]
    if by in ("layer", "both"):
        for i in range(layer_count):
            out[f"layer {i}"] = [f"model.layers.{j}.*" for j in range(layer_count) if j != i] + ["lm_head", "embed_tokens"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="dynamic", help="a benchmarks/accuracy.py method label")
    parser.add_argument("--by", choices=["type", "layer", "both"], default="type")
    parser.add_argument("--windows", type=int, default=4, help="512-token windows per held-out text")
    parser.add_argument("--calibration", type=int, default=8, help="calibration blocks of the bundled sample")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import accuracy
    import heldout_accuracy

    loaded, sample, evals, settings = heldout_accuracy.bundled_setup(args.windows, args.calibration)

    def row_of(model, label: str) -> dict:
        return {"group": label, **heldout_accuracy.perplexities(model, evals, args.windows)}

    base = row_of(loaded.model, "fp32")
    rows = [base]
    plan = {**groups(loaded.model.config.num_hidden_layers, args.by), f"all ({args.method})": None}
    for label, keep_float in plan.items():
        extra = {} if keep_float is None else {"keep_float": keep_float}
        model, _ = accuracy.quantize_one(loaded.model, args.method, sample, settings, extra_options=extra)
        rows.append(row_of(model, label))
        print(json.dumps(rows[-1]), flush=True)
        del model
    names = list(evals)
    print(f"\n{args.method}, one group quantized at a time (Δ perplexity vs fp32, {args.windows} windows per text)\n")
    print("| group | " + " | ".join(names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    for row in rows[1:]:
        deltas = [100 * (row[n] / base[n] - 1) for n in names]
        print(f"| {row['group']} | " + " | ".join(f"{d:+.2f}%" for d in deltas) + f" | {sum(deltas) / len(deltas):+.2f}% |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

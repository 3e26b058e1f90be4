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
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

#: method label -> (quantizer, options, is-QAT).  Every row spells out its outlier treatment
#: (rotate, smoothquant_alpha), static's observer and weight rounding, so that a change of
#: defaults does not change what an earlier row measured; "(default)" rows take the quantizer's
#: defaults.  (torch.ao static rows requantize outputs by the minmax rule since 2026-12-03.)
_NO_ROTATE = {"rotate": False}
_MINMAX = {"rotate": False, "observer": "minmax"}
METHODS = {
    "dynamic": ("dynamic", _NO_ROTATE, False),
    "dynamic (default)": ("dynamic", {}, False),
    "dynamic sq0.5": ("dynamic", {"smoothquant_alpha": 0.5}, False),
    "dynamic sq per-layer": ("dynamic", {"smoothquant_alpha": 0.5, "smoothquant_per_layer": True}, False),
    "dynamic rotate": ("dynamic", {"rotate": True}, False),
    "dynamic gptq": ("dynamic", {"weight_rounding": "gptq"}, False),
    "dynamic gptq untied": ("dynamic", {"weight_rounding": "gptq", "untie_head": True}, False),
    "dynamic rotate untied": ("dynamic", {"rotate": True, "untie_head": True}, False),
    "dynamic rotate budget2": ("dynamic", {"rotate": True, "ppl_budget": 2.0}, False),
    "dynamic rotate float-down": ("dynamic", {"rotate": True, "keep_float": ["*.mlp.down_proj"]}, False),
    "dynamic budget3": ("dynamic", {**_NO_ROTATE, "ppl_budget": 3.0}, False),
    "dynamic sq0.5 budget3": ("dynamic", {"smoothquant_alpha": 0.5, "ppl_budget": 3.0}, False),
    "static ftq": ("static", {**_MINMAX, "smoothquant_alpha": None, "ppl_budget": None}, False),
    "static ftq sq0.5": ("static", {**_MINMAX, "smoothquant_alpha": 0.5, "ppl_budget": None}, False),
    "static ftq sq0.5 budget2": ("static", {**_MINMAX, "smoothquant_alpha": 0.5}, False),
    "static ftq sq0.5 budget3": ("static", {**_MINMAX, "smoothquant_alpha": 0.5, "ppl_budget": 3.0}, False),
    "static ftq sq0.5 histogram": ("static", {**_NO_ROTATE, "smoothquant_alpha": 0.5, "ppl_budget": None,
                                              "observer": "histogram", "weight_rounding": "gptq"}, False),
    "static sq0.5 budget2": ("static", {"rotate": False, "smoothquant_alpha": 0.5, "weight_rounding": "gptq"}, False),
    "static sq per-layer budget2": ("static", {"rotate": False, "smoothquant_alpha": 0.5, "smoothquant_per_layer": True,
                                               "weight_rounding": "gptq"}, False),
    "static ftq sq per-layer histogram": ("static", {**_NO_ROTATE, "smoothquant_alpha": 0.5, "smoothquant_per_layer": True,
                                                     "ppl_budget": None, "observer": "histogram",
                                                     "weight_rounding": "gptq"}, False),
    "static ftq rotate minmax": ("static", {"rotate": True, "observer": "minmax", "ppl_budget": None}, False),
    "static ftq rotate minmax budget2": ("static", {"rotate": True, "observer": "minmax"}, False),
    "static ftq rotate histogram": ("static", {"rotate": True, "observer": "histogram", "ppl_budget": None}, False),
    "static ftq rotate histogram budget2": ("static", {"rotate": True, "observer": "histogram"}, False),
    "static (default)": ("static", {}, False),
    "static nearest": ("static", {"weight_rounding": "nearest"}, False),
    "static torch-ao (default)": ("static", {"backend": "torch-ao"}, False),
    "static torch-ao fbgemm (default)": ("static", {"backend": "torch-ao", "engine": "fbgemm"}, False),
    "static torch-ao qnnpack (default)": ("static", {"backend": "torch-ao", "engine": "qnnpack"}, False),
    "static torch-ao x86 sq0.5": ("static", {"backend": "torch-ao", "observer": "minmax", "smoothquant_alpha": 0.5,
                                             "ppl_budget": None}, False),
    "static torch-ao x86 sq0.5 budget3": ("static", {"backend": "torch-ao", "observer": "minmax",
                                                     "smoothquant_alpha": 0.5, "ppl_budget": 3.0}, False),
    "static torch-ao fbgemm sq0.5": ("static", {"backend": "torch-ao", "engine": "fbgemm", "observer": "minmax",
                                                "smoothquant_alpha": 0.5, "ppl_budget": None}, False),
    "static torch-ao qnnpack sq0.5": ("static", {"backend": "torch-ao", "engine": "qnnpack", "observer": "minmax",
                                                 "smoothquant_alpha": 0.5, "ppl_budget": None}, False),
    "qat-int8": ("qat-int8", {"rotate": False}, True),
    "qat-int8 (default)": ("qat-int8", {}, True),
    "qat-int8 rotate": ("qat-int8", {"rotate": True}, True),
    "qat-int8 rotate untied": ("qat-int8", {"rotate": True, "untie_head": True}, True),
    # the earlier defaults, as far as options reach (activation ranges now always start from calibration)
    "qat fbgemm sq0.5": ("qat", {"engine": "fbgemm", "rotate": False, "smoothquant_alpha": 0.5, "observer": "minmax",
                                 "per_token": [], "freeze_observers_after": 20}, True),
    "qat qnnpack sq0.5": ("qat", {"engine": "qnnpack", "rotate": False, "smoothquant_alpha": 0.5, "observer": "minmax",
                                  "per_token": [], "freeze_observers_after": 20}, True),
    "qat fbgemm sq0.5 per-token-down": ("qat", {"engine": "fbgemm", "rotate": False, "smoothquant_alpha": 0.5}, True),
    "qat fbgemm (default)": ("qat", {"engine": "fbgemm"}, True),
    "qat qnnpack (default)": ("qat", {"engine": "qnnpack"}, True),
    "qat onednn (default)": ("qat", {"engine": "onednn"}, True),
    "qat fbgemm float-down": ("qat", {"engine": "fbgemm", "keep_float": ["*.mlp.down_proj"]}, True),
    "qat qnnpack float-down": ("qat", {"engine": "qnnpack", "keep_float": ["*.mlp.down_proj"]}, True),
}

# static rows that do not name their weight rounding were measured before GPTQ became static's default
for _label, (_quantizer, _options, _qat) in list(METHODS.items()):
    if _quantizer == "static" and "(default)" not in _label and "weight_rounding" not in _options:
        METHODS[_label] = (_quantizer, {**_options, "weight_rounding": "nearest"}, _qat)


class Interleaved:
    """Blocks of two datasets taken in turn (the longer one's rest at the end), so the
    first calibration blocks come from both texts."""

    def __init__(self, first, second):
        shared = min(len(first), len(second))
        self.items = [(d, i) for i in range(shared) for d in (first, second)]
        self.items += [(d, i) for d in (first, second) for i in range(shared, len(d))]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        dataset, i = self.items[index]
        return dataset[i]


def build_data(tokenizer, token_blocks: Path | None = None):
    """The two texts as 512-token blocks, through the ``text`` dataset plugin.

    With ``token_blocks``, the blocks are read from that safetensors file when
    it exists (written by an earlier run otherwise), so a machine without the
    texts or the ``datasets`` package (a GPU box) measures on the same tokens.
    """
    from ftq_core.data import TokenBlocks
    from ftq_core.protocols import DataSplits
    from ftq_core.tensor_io import load_tensors, save_tensors

    if token_blocks is not None and token_blocks.is_file():
        tensors = load_tensors(token_blocks)
        return tuple(
            DataSplits(TokenBlocks(tensors[f"{name}.train"].flatten(), 512), TokenBlocks(tensors[f"{name}.eval"].flatten(), 512), 512, name)
            for name in ("shakespeare", "sample")
        )
    from ftq_core.plugins import get_plugins

    dataset = get_plugins().get("dataset", "text")
    shakespeare = dataset.create(dataset.make_config({"path": str(SHAKESPEARE), "block_size": 512})).build(tokenizer)
    sample = dataset.create(dataset.make_config({"block_size": 512, "eval_fraction": 0.2})).build(tokenizer)
    if token_blocks is not None:
        import torch

        blocks = lambda ds: torch.stack([ds[i] for i in range(len(ds))])  # noqa: E731
        save_tensors(token_blocks, {f"{n}.{part}": blocks(getattr(s, part)) for n, s in (("shakespeare", shakespeare), ("sample", sample)) for part in ("train", "eval")})
    return shakespeare, sample


def resolve(method: str, args):
    """A method label, optionally followed by QAT settings: ``qat fbgemm sq0.5 lr5e-5 s200 b4 f100``.

    ``lr``: peak learning rate, ``s``: steps, ``b``: batch, ``f``: freeze observers after that step,
    ``d``: distillation weight (trainer option ``distill``).
    """
    words = method.split()
    settings = {}
    keys = {"lr": ("qat_lr", float), "s": ("qat_steps", int), "b": ("qat_batch", int), "f": ("freeze_after", int), "d": ("distill", float)}
    while words and " ".join(words) not in METHODS:
        word = words.pop()
        prefix = word.rstrip("0123456789.e-+")
        if prefix not in keys or prefix == word:
            raise SystemExit(f"unknown method {method!r}; known: {', '.join(METHODS)} (+ lrX sN bN fN for QAT)")
        attr, kind = keys[prefix]
        settings[attr] = kind(word[len(prefix):])
    if not words:
        raise SystemExit(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return " ".join(words), argparse.Namespace(**{**vars(args), **settings})


def quantize_one(float_model, method: str, splits, args, extra_options: dict | None = None):
    """``method``'s int8 model of a copy of ``float_model`` (``extra_options`` over the method's own)."""
    from ftq_core.pipeline import calibrate
    from ftq_core.plugins import get_plugins

    plugins = get_plugins()
    method, args = resolve(method, args)
    name, options, qat = METHODS[method]
    options = {**options, **(extra_options or {})}
    if qat and args.freeze_after is not None:
        options = {**options, "freeze_observers_after": args.freeze_after}
    component = plugins.get("quantizer", name)
    quantizer = component.create(component.make_config(options))
    model = quantizer.prepare(copy.deepcopy(float_model))
    if quantizer.needs_calibration:
        calibrate(model, splits.train, batches=args.calibration, progress=False)
    if qat:
        model = quantizer.on_calibrated(model) if getattr(quantizer, "on_calibrated", None) else model
        trainer = plugins.get("trainer", "causal-lm")
        config = trainer.make_config(
            {"max_steps": args.qat_steps, "batch_size": args.qat_batch, "lr": args.qat_lr, "warmup_steps": args.qat_warmup,
             "checkpoint_every": 0, "progress": False, "device": args.qat_device, "distill": args.distill, "eval_every": 0,
             "precision": getattr(args, "qat_precision", "auto")}
        )
        teacher = {"teacher": copy.deepcopy(float_model)} if args.distill else {}
        trainer.create(config).train(model, splits, checkpoint_dir=None, resume=False, on_step=quantizer.on_train_step, **teacher)
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
    parser.add_argument("--qat-steps", type=int, default=30, help="QAT fine-tune steps")
    parser.add_argument("--qat-batch", type=int, default=1, help="QAT batch (blocks of 512 tokens)")
    parser.add_argument("--qat-lr", type=float, default=1e-5, help="QAT peak learning rate (cosine decay)")
    parser.add_argument("--qat-warmup", type=int, default=5, help="QAT warm-up steps")
    parser.add_argument("--freeze-after", type=int, default=None, help="QAT: freeze observers after this step (default: the method's)")
    parser.add_argument("--distill", type=float, default=0.0, help="QAT: weight of distillation from the float model")
    parser.add_argument("--qat-device", default="auto", help="where QAT trains: auto (CUDA if any), cuda or cpu; int8 runs on the CPU")
    parser.add_argument("--qat-precision", default="auto", help="trainer precision for QAT: auto, fp32 or bf16")
    parser.add_argument("--train-on", choices=["shakespeare", "both"], default="shakespeare",
                        help="calibration and QAT data: tinyshakespeare's training part, or the training parts of both texts")
    parser.add_argument("--model", default="smollm2", help="bundled model name or .gguf file")
    parser.add_argument("--token-blocks", type=Path, help="safetensors file of the tokenized texts: read if present, else written")
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--json", type=Path, help="write rows as JSON here")
    args = parser.parse_args(argv)
    if not SHAKESPEARE.is_file() and not (args.token_blocks and args.token_blocks.is_file()):
        print(f"needs {SHAKESPEARE} (or --token-blocks from an earlier run)", file=sys.stderr)
        return 2
    import torch

    from ftq_core.models import load_model

    loaded = load_model(args.model)
    shakespeare, sample = build_data(loaded.tokenizer, args.token_blocks)
    evals = {"shakespeare": shakespeare.eval, "sample": sample.eval}
    calibration = shakespeare
    if args.train_on == "both":  # the training parts of both texts; their held-out tails stay unseen
        calibration = dataclasses.replace(shakespeare, train=Interleaved(shakespeare.train, sample.train), description="both")
    rows = [measure(loaded.model, "fp32", evals, args)]
    print(json.dumps(rows[-1]), flush=True)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        started = time.perf_counter()
        model, layers = quantize_one(loaded.model, method, calibration, args)
        row = measure(model, method, evals, args)
        row["quantize_s"] = time.perf_counter() - started
        row["layers_int8"] = sum(layer.quantized for layer in layers)
        row["kept_float"] = {l.name: l.reason for l in layers if not l.quantized and l.reason.startswith("sensitivity")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        if args.json:  # after every row: a long run that is cut short keeps what it measured
            args.json.write_text(json.dumps({"rows": rows, "threads": torch.get_num_threads(), "args": vars(args)}, indent=2, default=str))
    print(table(rows, args))
    return 0


def table(rows, args) -> str:
    base = rows[0]
    lines = [
        "| method | ppl tinyshakespeare | Δ | ppl sample | Δ | prefill ms (1×256) | decode tok/s | int8 layers |",
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

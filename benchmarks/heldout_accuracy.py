"""Accuracy away from the calibration data: ftq's int8 methods on held-out texts of other genres.

    python benchmarks/heldout_accuracy.py [--methods 'dynamic,static (default)'] [--windows 6] [--model M]

The bundled SmolLM2-135M (or ``--model``: a ``.gguf`` file or model directory) is calibrated, as a user who quantizes it alone
would, on the bundled English sample (``plugins/data/sample.txt``, the
``text`` dataset's training split); perplexity is measured on texts that no
calibration, fine-tuning or fallback step ever sees, each of another genre:

* ``drama``: the last 10% of tinyshakespeare (``../shared/data``);
* ``code``: Python source from the standard library of the interpreter that
  runs this script (``argparse.py``, ``textwrap.py``, ``json/decoder.py``);
* ``legal``: the Python license shipped with that interpreter (``LICENSE.txt``);

next to the sample's own held-out tail (``sample tail``, in-domain).  Windows
of 512 tokens, the first ``--windows`` of each text; perplexity is
deterministic.  Each text's SHA-256 is printed with the table (the stdlib
files differ between Python versions).  Method labels are those of
``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
STDLIB = Path(sysconfig.get_paths()["stdlib"])

DEFAULT_METHODS = ("dynamic,dynamic sq0.5,dynamic (default),dynamic rotate untied,static ftq sq0.5 budget2,"
                   "static ftq rotate histogram,static (default)")


def held_out_texts() -> dict[str, str]:
    """Genre name -> text, none of them used by any calibration or training step."""
    drama = SHAKESPEARE.read_text(encoding="utf-8")
    code = "\n\n".join((STDLIB / name).read_text(encoding="utf-8")
                       for name in ("argparse.py", "textwrap.py", "json/decoder.py"))
    legal = (STDLIB / "LICENSE.txt").read_text(encoding="utf-8")
    return {"drama": drama[int(len(drama) * 0.9):], "code": code, "legal": legal}


def windows(tokenizer, text: str, count: int):
    """The first ``count`` 512-token windows of ``text`` as token blocks."""
    from ftq_core.data import TokenBlocks

    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    usable = min(len(ids) // 512, count) * 512
    return TokenBlocks(ids[:usable], 512)


def bundled_setup(window_count: int, calibration: int, model: str = "smollm2"):
    """``(loaded bundled model, its sample splits, held-out sets by name, accuracy.py settings)``.

    The held-out sets are the first ``window_count`` windows of each text of
    :func:`held_out_texts` and the sample's own tail; calibration (where a
    method has any) uses ``calibration`` blocks of the sample's training split.
    """
    from ftq_core.models import load_model
    from ftq_core.plugins import get_plugins

    loaded = load_model(model)
    dataset = get_plugins().get("dataset", "text")
    sample = dataset.create(dataset.make_config({"block_size": 512, "eval_fraction": 0.2})).build(loaded.tokenizer)
    evals = {name: windows(loaded.tokenizer, text, window_count) for name, text in held_out_texts().items()}
    evals["sample tail"] = sample.eval
    settings = argparse.Namespace(calibration=calibration, freeze_after=None, qat_steps=30, qat_batch=1,
                                  qat_lr=1e-5, qat_warmup=5, qat_device="cpu", distill=0.0,
                                  qat_precision="auto")
    return loaded, sample, evals, settings


def perplexities(model, evals: dict, window_count: int) -> dict[str, float]:
    """Perplexity of ``model`` on each held-out set."""
    from ftq_core.evaluation import perplexity

    return {name: perplexity(model, blocks, max_blocks=window_count)[0] for name, blocks in evals.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma list of benchmarks/accuracy.py method labels")
    parser.add_argument("--windows", type=int, default=6, help="512-token windows per held-out text")
    parser.add_argument("--calibration", type=int, default=8, help="calibration blocks of the bundled sample")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--model", default="smollm2", help="the bundled model, a .gguf file or a model directory")
    parser.add_argument("--qat-precision", default="auto", help="trainer precision of QAT methods: auto, fp32 or bf16")
    args = parser.parse_args(argv)
    if not SHAKESPEARE.is_file():
        print(f"needs {SHAKESPEARE}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    import accuracy  # the method table and quantization of benchmarks/accuracy.py

    loaded, sample, evals, settings = bundled_setup(args.windows, args.calibration, args.model)
    settings.qat_precision = args.qat_precision
    texts = held_out_texts()

    def row_of(model, label: str) -> dict:
        return {"method": label, **perplexities(model, evals, args.windows)}

    rows = [row_of(loaded.model, "fp32")]
    print(json.dumps(rows[-1]), flush=True)
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        model, layers = accuracy.quantize_one(loaded.model, method, sample, settings)
        rows.append(row_of(model, method))
        rows[-1]["kept_float"] = sorted(l.name for l in layers if not l.quantized and l.reason.startswith("sensitivity"))
        print(json.dumps(rows[-1]), flush=True)
        del model
    names = list(evals)
    base = rows[0]
    print("\n| method | " + " | ".join(f"{n} Δ ppl" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for row in rows:
        cells = [f"{row[n]:.2f}" if row is base else f"{100 * (row[n] / base[n] - 1):+.1f}%" for n in names]
        print(f"| {row['method']} | " + " | ".join(cells) + " |")
    print("\ntexts: " + "; ".join(f"{n}: {len(evals[n])} windows, sha256 {hashlib.sha256(t.encode()).hexdigest()[:12]}"
                                  for n, t in texts.items()) + f"; Python {sys.version.split()[0]}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

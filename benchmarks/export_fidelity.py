"""How close exported files stay to the float model: GGUF q8_0/f16 (read back by transformers) vs ftq's int8.

    python benchmarks/export_fidelity.py [--text ../shared/data/tinyshakespeare.txt] [--tokens 512]

Loads the bundled SmolLM2-135M, saves it as a float artifact, exports that with
``ftq_core.export(..., "gguf", {"type": ...})``, reads each file back with
``AutoModelForCausalLM.from_pretrained(..., gguf_file=)`` and prints the
relative L2 error of its logits against the float model's on the text's last
tokens, next to ftq's own ``dynamic`` int8 (W8A8) on the same tokens, with
file sizes and export times.  Deterministic; one process.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import ftq_core
    from ftq_core.artifacts import save_artifact
    from ftq_core.models import load_model

    loaded = load_model("smollm2")
    float_model = loaded.model.eval()
    ids = loaded.tokenizer(Path(args.text).read_text()[-20 * args.tokens:], return_tensors="pt").input_ids[:, -args.tokens:]
    with torch.no_grad():
        reference = float_model(input_ids=ids).logits

    def error(model) -> float:
        with torch.no_grad():
            return float((model(input_ids=ids).logits - reference).norm() / reference.norm())

    rows = [("ftq int8 dynamic (W8A8, per-token)", error(ftq_core.quantize(copy.deepcopy(float_model), "dynamic").model), "", "")]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        kept = ftq_core.quantize(copy.deepcopy(float_model), "dynamic", {"keep_float": ["*"], "quantize_embeddings": False})
        save_artifact(kept.model, loaded.tokenizer, work / "float", manifest={"method": "dynamic", "source_model": loaded.source})
        for storage in ("q8_0", "f16"):
            start = time.perf_counter()
            ftq_core.export(work / "float", work / storage, "gguf", {"type": storage})
            seconds = time.perf_counter() - start
            path = work / storage / f"model-{storage}.gguf"
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            rows.append((f"GGUF {storage} (ftq export, read by transformers)", error(model),
                         f"{path.stat().st_size / 2**20:.0f}", f"{seconds:.0f}"))
    print(f"\n{ids.shape[1]} tokens of {Path(args.text).name}; relative L2 error of the logits against float32\n")
    print("| model | logits rel. L2 vs float32 | file MB | export s (incl. read-back) |")
    print("|---|---:|---:|---:|")
    for name, value, size, seconds in rows:
        print(f"| {name} | {value:.2%} | {size} | {seconds} |")


if __name__ == "__main__":
    main()

"""llama.cpp itself loads ftq's GGUF export of every family and computes the logits ftq's float model does.

    python benchmarks/gguf_families_llama_cpp.py --llama-cpp DIR [--out results.json]

``DIR`` is a llama.cpp source tree built with CMake (``build/src/libllama.a``
and the ggml libraries; the ``llama-cpp-python`` sdist's ``vendor/llama.cpp``
built as the developers' brief says).  The script compiles
``llama_cpp/gguf_logits.cpp`` against it, then for each family of the family
matrix builds the tiny random-init model of ``tests/ftq_testing.py`` (its
quirks on), saves it as a float artifact, exports it with
``ftq_core.export(..., "gguf", {"type": T})`` for ``f32`` and ``q8_0``, and
compares llama.cpp's logits for one prompt (every position) with the float
model's in transformers: relative L2, and whether the greedy next token
agrees at every position.  llama.cpp is an anchor here, never a dependency.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

#: The prompt: token ids spread over the tiny vocabulary, shorter than every family's sliding window.
PROMPT = [(7 * i + 3) % 500 + 3 for i in range(40)]


def build_logits_tool(llama_cpp: Path, into: Path) -> Path:
    """``gguf_logits`` linked statically against the llama.cpp build in ``llama_cpp``."""
    build = llama_cpp / "build"
    libraries = [build / "src" / "libllama.a", build / "ggml" / "src" / "libggml.a",
                 build / "ggml" / "src" / "libggml-cpu.a", build / "ggml" / "src" / "libggml-base.a"]
    missing = [str(p) for p in libraries if not p.is_file()]
    if missing:
        raise SystemExit(f"{llama_cpp} is not a built llama.cpp tree (missing {', '.join(missing)}); build it with CMake")
    tool = into / "gguf_logits"
    subprocess.run(["g++", "-O2", "-std=c++17", "-I", str(llama_cpp / "include"), "-I", str(llama_cpp / "ggml" / "include"),
                    str(HERE / "llama_cpp" / "gguf_logits.cpp"), *map(str, libraries), "-fopenmp", "-lpthread", "-ldl",
                    "-o", str(tool)], check=True)
    return tool


def llama_cpp_logits(tool: Path, gguf_file: Path, vocab: int):
    import numpy as np

    out = gguf_file.with_suffix(".logits")
    subprocess.run([str(tool), str(gguf_file), str(out), *map(str, PROMPT)], check=True, capture_output=True)
    return np.fromfile(out, dtype=np.float32).reshape(len(PROMPT), vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp source tree built with CMake")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()

    import numpy as np
    import torch
    from ftq_testing import FAMILY_MODEL_TYPES, make_tiny_family_model, make_tiny_tokenizer

    import ftq_core
    from ftq_core.artifacts import save_artifact
    from ftq_core.model_families import family_of

    tokenizer = make_tiny_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        tool = build_logits_tool(args.llama_cpp.resolve(), scratch)
        for model_type in FAMILY_MODEL_TYPES:
            model = make_tiny_family_model(model_type, vocab_size=len(tokenizer))
            with torch.no_grad():
                reference = model(input_ids=torch.tensor([PROMPT])).logits[0].numpy()
            artifact = scratch / model_type / "tiny-model"
            save_artifact(model, tokenizer, artifact, manifest={"method": "none"})
            row = {"family": family_of(model).name, "gguf_arch": family_of(model).gguf_arch}
            for storage in ("f32", "q8_0"):
                exported = scratch / model_type / storage
                ftq_core.export(artifact, exported, "gguf", {"type": storage})
                got = llama_cpp_logits(tool, exported / f"model-{storage}.gguf", model.config.vocab_size)
                row[f"{storage}_rel_l2"] = float(np.linalg.norm(got - reference) / np.linalg.norm(reference))
                row[f"{storage}_argmax_agree"] = float((got.argmax(-1) == reference.argmax(-1)).mean())
            rows.append(row)
            print(f"{row['family']:<9} {row['gguf_arch']:<7} f32 {row['f32_rel_l2']:.2e} "
                  f"(argmax {row['f32_argmax_agree']:.0%})  q8_0 {row['q8_0_rel_l2']:.2e} "
                  f"(argmax {row['q8_0_argmax_agree']:.0%})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

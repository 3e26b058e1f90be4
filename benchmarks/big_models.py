"""Time and peak memory of ftq's commands on models of real sizes (random weights), one step at a time.

Each step runs as its own process (the ftq CLI), and its peak resident memory
is read from the kernel's accounting of that child (``ru_maxrss``), so no
step is charged for another.  Models come from ``benchmarks/shaped_models.py``
(bf16 safetensors shards).  Steps:

* ``quantize``: ``ftq quantize --layerwise on`` with ``dynamic`` defaults;
* ``quantize-whole``: the same with ``--layerwise off`` (the old path; only where it fits);
* ``static-gptq``: ``static`` (rotation, GPTQ codes) layer by layer, ``ppl_budget=none``;
* ``eval`` / ``generate``: the int8 artifact loaded and run;
* ``export-gguf``: ``ftq export --format gguf`` (q8_0, streamed tensor by tensor, read back tensor by tensor
  where two float copies would not fit);
* ``lora``: ``ftq run --adapter lora`` over the int8 artifact for a few steps;
* ``lora-float``: ``ftq run --adapter lora`` straight from the float checkpoint (quantized layer by layer
  into ``<out>/base`` first, then the same steps);
* ``resume``: a layer-by-layer quantization killed (SIGKILL) part-way, run again, and compared bit for bit
  with the uninterrupted artifact.

    python benchmarks/big_models.py --model /data/shapes/llama-3.2-3b --steps quantize,eval,lora --out /tmp/bench

prints a markdown table (step, time, peak memory, artifact size, ratio to the artifact) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

STEPS = ("quantize", "quantize-whole", "static-gptq", "eval", "generate", "export-gguf", "lora", "lora-float", "resume")


def measured(command: list[str], *, kill_after: float | None = None) -> dict:
    """Run ``command`` in a child that reports its own peak memory; ``kill_after``: SIGKILL it after that many s."""
    probe = (
        "import resource, subprocess, sys, time, signal\n"
        "start = time.perf_counter()\n"
        "child = subprocess.Popen(sys.argv[2:])\n"
        "limit = float(sys.argv[1])\n"
        "try:\n"
        "    code = child.wait(timeout=limit if limit > 0 else None)\n"
        "except subprocess.TimeoutExpired:\n"
        "    child.send_signal(signal.SIGKILL); code = child.wait()\n"
        "print('MEASURED', code, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(kill_after or 0), *command], capture_output=True, text=True)
    line = next((l for l in result.stdout.splitlines() if l.startswith("MEASURED")), None)
    if line is None:
        raise RuntimeError(f"{command} did not report: {result.stderr[-2000:]}")
    _, code, seconds, kib = line.split()
    return {"code": int(code), "seconds": float(seconds), "peak_bytes": int(kib) * 1024, "stderr": result.stderr[-3000:],
            "stdout": result.stdout[-3000:]}


def size_of(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def tensors_equal(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    def all_tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    x, y = all_tensors(a), all_tensors(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory from shaped_models.py")
    parser.add_argument("--steps", default="quantize,eval,generate", help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lora-steps", type=int, default=3)
    parser.add_argument("--kill-after", type=float, default=60.0, help="seconds into the run the resume step kills it")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ftq = [sys.executable, "-m", "ftq_core.cli"]
    artifact = args.out / "int8"
    rows = []
    params = json.loads((args.model / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2
    for step in args.steps.split(","):
        extra = {}
        if step == "quantize":
            r = measured([*ftq, "quantize", str(args.model), "-o", str(artifact), "--layerwise", "on"])
        elif step == "quantize-whole":
            r = measured([*ftq, "quantize", str(args.model), "-o", str(args.out / "int8-whole"), "--layerwise", "off"])
        elif step == "static-gptq":
            r = measured([*ftq, "quantize", str(args.model), "-o", str(args.out / "static"), "-q", "static",
                          "--layerwise", "on", "--set", "ppl_budget=none"])
            extra["artifact_bytes"] = size_of(args.out / "static") if r["code"] == 0 else None
        elif step == "eval":
            r = measured([*ftq, "eval", str(artifact), "--set", "eval.max_blocks=2", "--set", "eval.repeats=1",
                          "--set", "eval.decode_tokens=8", "--set", "eval.prefill_tokens=64"])
        elif step == "generate":
            r = measured([*ftq, "generate", str(artifact), "-p", "The history of", "--max-new-tokens", "16"])
        elif step == "export-gguf":
            exported = args.out / "gguf"
            shutil.rmtree(exported, ignore_errors=True)  # an earlier run's file: ftq export never overwrites
            r = measured([*ftq, "export", str(artifact), "-o", str(exported), "--format", "gguf"])
            extra["gguf_bytes"] = sum(p.stat().st_size for p in exported.glob("*.gguf")) if r["code"] == 0 else None
            extra["written"] = next((l for l in r["stdout"].splitlines() if ".gguf:" in l), None)
        elif step == "lora":
            r = measured([*ftq, "run", "--model", str(artifact), "--adapter", "lora", "-o", str(args.out / "lora"),
                          "--max-steps", str(args.lora_steps), "--set", "trainer.batch_size=1",
                          "--set", "dataset.block_size=256", "--set", "eval.max_blocks=1"])
        elif step == "lora-float":
            r = measured([*ftq, "run", "--model", str(args.model), "--adapter", "lora", "-o", str(args.out / "lora-float"),
                          "--max-steps", str(args.lora_steps), "--set", "trainer.batch_size=1", "--set", "layerwise=on",
                          "--set", "dataset.block_size=256", "--set", "eval.max_blocks=1"])
        elif step == "resume":
            target = args.out / "int8-resumed"
            killed = measured([*ftq, "quantize", str(args.model), "-o", str(target), "--layerwise", "on"],
                              kill_after=args.kill_after)
            work = target.parent / f".{target.name}.layerwise"
            done = len(json.loads((work / "progress.json").read_text())["layers"]) if work.is_dir() else 0
            r = measured([*ftq, "quantize", str(args.model), "-o", str(target), "--layerwise", "on"])
            extra = {"killed_after_s": killed["seconds"], "layers_kept": done,
                     "equal_to_uninterrupted": tensors_equal(target, artifact) if artifact.is_dir() else None}
        else:
            raise SystemExit(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        if step in ("quantize", "quantize-whole") and r["code"] == 0:
            extra["artifact_bytes"] = size_of(artifact if step == "quantize" else args.out / "int8-whole")
        row = {"step": step, "model": args.model.name, "parameters": params, **r, **extra}
        if r["code"] != 0:
            print(r["stderr"], file=sys.stderr)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("stderr", "stdout")}), flush=True)
    int8 = size_of(artifact) if artifact.is_dir() else None
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| model | step | exit | time | peak RSS | int8 artifact | peak / artifact | notes |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        ratio = f"{row['peak_bytes'] / int8:.2f}x" if int8 else ""
        notes = ", ".join(f"{k}={row[k]}" for k in ("layers_kept", "equal_to_uninterrupted", "killed_after_s", "gguf_bytes") if k in row)
        print(f"| {row['model']} | {row['step']} | {row['code']} | {row['seconds']:.0f} s | "
              f"{row['peak_bytes'] / 2**30:.2f} GiB | {(int8 or 0) / 2**30:.2f} GiB | {ratio} | {notes} |")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""One rank of a data-parallel ``ftq_core.run`` (started by torchrun from test_distributed.py).

Usage: ``distributed_worker.py MODEL_DIR OUT_DIR BATCH_SIZE [ADAPTER]``.  Writes
what this rank ended with (the converted int8 model's tensors) to
``OUT_DIR/rank-<RANK>.safetensors``.  With ADAPTER (``lora``) the run quantizes
with ``dynamic`` and trains that adapter over the int8 model instead of QAT.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("FTQ_LOAD_PLUGINS", "")


def run_options(model_dir: str, out_dir: str, batch_size: int, adapter: str | None = None) -> dict:
    """The run every rank makes; a single process with ``batch_size * N`` makes the same one.

    In float32: under bf16 autocast ranks and one process agree only to bf16
    rounding (their GEMMs see other batch shapes).
    """
    options = {
        "model": model_dir,
        "output_dir": os.path.join(out_dir, "run"),
        "dataset": {"name": "text", "block_size": 32},
        "trainer": {"name": "causal-lm", "max_steps": 3, "batch_size": batch_size, "lr": 1e-3, "warmup_steps": 0,
                    "checkpoint_every": 2, "keep_checkpoints": 2, "progress": False, "seed": 3,
                    "precision": "fp32"},
        "quantizer": {"name": "qat-int8"},
        "evaluate_pretrained": False,
        "keep_checkpoints": True,
        "eval": {"max_blocks": 2, "prefill_tokens": 16, "decode_tokens": 4, "repeats": 1},
    }
    if adapter is not None:
        options |= {"quantizer": {"name": "dynamic"}, "adapter": {"name": adapter, "rank": 4}}
    return options


def main() -> None:
    import torch
    from safetensors.torch import save_file

    import ftq_core

    torch.set_num_threads(1)
    model_dir, out_dir, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    adapter = sys.argv[4] if len(sys.argv) > 4 else None
    result = ftq_core.run(run_options(model_dir, out_dir, batch_size, adapter))
    state = {k: v.contiguous().clone() for k, v in result.model.state_dict().items()}  # tied tensors as copies
    save_file(state, os.path.join(out_dir, f"rank-{result.rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank-{result.rank}.txt"), "w") as f:
        f.write(f"{result.world_size} {result.train.final_train_loss!r} {bool(result.rows)}\n")


if __name__ == "__main__":
    main()

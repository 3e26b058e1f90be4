"""Builders shared by the tests: tiny random-init models, a tiny tokenizer, and a memory and time bound.

A module of its own (not conftest) so that test directories with their own
conftest.py never shadow it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_TEXT = REPO / "plugins" / "data" / "sample.txt"


def make_tiny_tokenizer():
    """The tokenizer of :func:`tiny_tokenizer`, for code that is not a test (helpers, subprocess setups)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT.read_text()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def make_tiny_llama(vocab_size: int = 512, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(vocab_size: int = 512, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    return GPT2LMHeadModel(config).eval()


def write_jsonl(path: Path, rows: list) -> Path:
    """``rows`` as a JSON-lines file at ``path`` (one object a line, UTF-8)."""
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


class OverBudget(AssertionError):
    """A bounded call ran past its time budget."""


@contextlib.contextmanager
def bounded(*, seconds: float = 10.0, extra_bytes: int = 1 << 30):
    """Run the block with at most ``extra_bytes`` more address space and ``seconds`` of wall time.

    For the fuzz tests: a hostile file must cost bounded memory and time.
    The address-space limit is lowered for the block and raised back after
    (an unprivileged process may raise its soft limit up to the hard one), so
    an allocation past the budget fails as ``MemoryError`` inside the block
    instead of taking the machine down.  The time budget is a ``SIGALRM``
    raising :class:`OverBudget` (main thread only, POSIX only).
    """
    import resource
    import signal

    import numpy

    # OpenBLAS reserves its buffers on first use and exits the process if it cannot:
    # start it before the limit, so the budget counts only the block's own work.
    numpy.ones((4, 4)) @ numpy.ones((4, 4))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        in_use = int(statm.read().split()[0]) * resource.getpagesize()
    limit = in_use + extra_bytes if hard == resource.RLIM_INFINITY else min(hard, in_use + extra_bytes)

    def over(signum, frame):
        raise OverBudget(f"took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, over)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


#: The model families of the family matrix, by ``model_type`` (see ``ftq_core.model_families``).
FAMILY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")


def make_tiny_family_model(model_type: str, vocab_size: int = 512, seed: int = 0):
    """A 2-layer random-init model of the family ``model_type``, each with its family's quirks switched on
    (Qwen2's q/k/v biases, Qwen3's q/k norms, Phi-3's fused projections, Mistral's and Phi-3's sliding window
    of 64 tokens, Gemma's norm offset and soft-capping)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 bos_token_id=1, eos_token_id=2, pad_token_id=2)
    quirks = {
        "llama": dict(tie_word_embeddings=True),
        "mistral": dict(sliding_window=64, tie_word_embeddings=False),
        "qwen2": dict(tie_word_embeddings=True, rope_theta=1_000_000.0),
        "qwen3": dict(tie_word_embeddings=True, head_dim=16),
        "phi3": dict(tie_word_embeddings=False, original_max_position_embeddings=512, sliding_window=64),
        "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64, hidden_activation="gelu_pytorch_tanh"),
        "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=64),
    }[model_type]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **shape, **quirks)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 (0 with Gemma's offset): move them, so a missed norm shows
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    return model

"""A tokenizer as llama.cpp's GGUF vocabulary: a GPT-2 style byte-level BPE (tokens, types, merges, ids, template)."""

from __future__ import annotations

import json

from ftq_core.api import ArtifactError

__all__ = ["add_tokenizer", "check_vocabulary", "byte_level", "pre_tokenizer_name", "source_pre_tokenizer"]


def _pre_tokenizer_steps(tokenizer_json: dict) -> list[dict]:
    """The pre-tokenizer's steps in order (one, or a ``Sequence``'s)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return [step for step in steps if step]


def byte_level(tokenizer_json: dict) -> bool:
    """Whether the tokenizer splits text GPT-2 style (byte-level BPE), the vocabulary type written here."""
    return any(step.get("type") == "ByteLevel" for step in _pre_tokenizer_steps(tokenizer_json))


def _vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """``(tokens in id order, llama.cpp token types, merges)`` of a byte-level BPE tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not byte_level(spec):
        raise ArtifactError(
            "the tokenizer is not a byte-level BPE (a SentencePiece-style vocabulary, as Llama 2 and Mistral have), "
            "and the gguf exporter writes byte-level vocabularies only; export it with --format hf"
        )
    special = set(tokenizer.all_special_ids)
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if not token.special}
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
        if token is None:  # ids the embedding has and the tokenizer does not use
            tokens.append(f"[PAD{token_id}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        tokens.append(token)
        if token_id in special:
            types.append(int(gguf.TokenType.CONTROL))
        elif token_id in added:
            types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for token in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            ids[token] = int(token_id)
    return ids


def add_tokenizer(writer, tokenizer, vocab_size: int, pre_tokenizer: str) -> None:
    """The tokenizer as llama.cpp's GPT-2 style BPE vocabulary: tokens in id order, types, merges, ids, template."""
    tokens, types, merges = _vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id}
    for token, token_id in _special_ids(tokenizer).items():
        adders[token](token_id)
    # whether encoding starts with BOS, as the tokenizer does it (an attribute or its post-processor)
    bos = getattr(tokenizer, "bos_token_id", None)
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def check_vocabulary(reader, tokenizer, vocab_size: int) -> None:
    """Refuse a file whose vocabulary (tokens, types, merges, special ids, chat template), read back with the
    ``gguf`` package, is not the tokenizer's."""
    from gguf import Keys

    tokens, types, merges = _vocabulary(tokenizer, vocab_size)
    id_keys = {"bos": Keys.Tokenizer.BOS_ID, "eos": Keys.Tokenizer.EOS_ID, "unk": Keys.Tokenizer.UNK_ID,
               "pad": Keys.Tokenizer.PAD_ID}
    expected = {Keys.Tokenizer.MODEL: "gpt2", Keys.Tokenizer.LIST: tokens, Keys.Tokenizer.TOKEN_TYPE: types,
                Keys.Tokenizer.MERGES: merges,
                **{id_keys[token]: i for token, i in _special_ids(tokenizer).items()}}
    if getattr(tokenizer, "chat_template", None):
        expected[Keys.Tokenizer.CHAT_TEMPLATE] = tokenizer.chat_template
    for key, value in expected.items():
        field = reader.fields.get(key)
        if field is None or field.contents() != value:
            raise ArtifactError(f"the GGUF file's {key} reads back differently from the tokenizer's; "
                                f"the export was not kept")


#: llama.cpp's pre-tokenizer names by the splitting rules of a byte-level BPE's ``tokenizer.json``: its ``Split``
#: patterns and ``Digits`` steps in order, and whether ``ByteLevel`` splits with GPT-2's own pattern.  The names
#: are those of ``convert_hf_to_gguf.py``; their rules, those of ``llama-vocab.cpp``.
_LLAMA_CPP_PRE_TOKENIZERS = {
    ((), True): "gpt-2",
    (("digits",), True): "smollm",
    ((r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
      r"|\s+(?!\S)|\s+",), False): "qwen2",
    ((r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
      r"|\s+(?!\S)|\s+",), False): "llama-bpe",
}


def _splitting_rules(tokenizer_json: dict) -> tuple[tuple[str, ...], bool]:
    """``(Split patterns and "digits" steps in order, whether ByteLevel applies GPT-2's pattern)``."""
    rules, gpt2_pattern = [], False
    for step in _pre_tokenizer_steps(tokenizer_json):
        kind = step.get("type")
        if kind == "Split":
            rules.append(str((step.get("pattern") or {}).get("Regex", step.get("pattern"))))
        elif kind == "Digits":
            rules.append("digits" if step.get("individual_digits") else "digit runs")
        elif kind == "ByteLevel":
            gpt2_pattern = bool(step.get("use_regex", True))
    return tuple(rules), gpt2_pattern


def pre_tokenizer_name(tokenizer, manifest: dict) -> str:
    """The pre-tokenizer name llama.cpp splits the vocabulary's text by.

    The source GGUF's where the artifact came from one, else the name of the
    tokenizer's own splitting rules (GPT-2's, SmolLM's, Qwen2's, Llama 3's).
    Rules llama.cpp has no name for here are an :class:`ArtifactError`: a file
    naming other rules would tokenize prompts differently in llama.cpp.
    """
    source = source_pre_tokenizer(manifest)
    if source is not None:
        return source
    rules = _splitting_rules(json.loads(tokenizer.backend_tokenizer.to_str()))
    name = _LLAMA_CPP_PRE_TOKENIZERS.get(rules)
    if name is None:
        steps, gpt2_pattern = rules
        shown = ", ".join(repr(step[:40]) for step in steps) + (", then GPT-2's pattern" if gpt2_pattern else "")
        raise ArtifactError(
            f"the tokenizer splits text by rules the gguf exporter has no llama.cpp name for ({shown or 'none'}), "
            f"and llama.cpp would tokenize prompts otherwise; export it with --format hf and convert that with "
            f"llama.cpp's convert_hf_to_gguf.py")
    return name


def source_pre_tokenizer(manifest: dict) -> str | None:
    """The pre-tokenizer name in the model's source GGUF file (recorded in the manifest as ``... gguf:PATH ...``),
    or ``None`` where there is none or it cannot be read."""
    import re

    from ftq_core.api import FtqError
    from ftq_core.gguf_header import read_gguf_header

    match = re.search(r"gguf:(.+?\.gguf)", str(manifest.get("source_model", "")))
    if match:
        try:
            # the bounded header walk, not gguf's reader: the manifest may name any file, damaged or hostile
            pre = read_gguf_header(match.group(1)).values.get("tokenizer.ggml.pre")
            if isinstance(pre, str):
                return pre
        except FtqError:
            pass  # the source moved or is damaged: the tokenizer's own rules decide
    return None

"""A tokenizer as llama.cpp's GGUF vocabulary: a GPT-2 style byte-level BPE (tokens, types, merges, ids, template)."""

from __future__ import annotations

import json

from ftq_core.api import ArtifactError

__all__ = ["add_tokenizer", "check_vocabulary", "byte_level", "source_pre_tokenizer"]


def byte_level(tokenizer_json: dict) -> bool:
    """Whether the tokenizer splits text GPT-2 style (byte-level BPE), the vocabulary type written here."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps if step)


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


def source_pre_tokenizer(manifest: dict) -> str:
    """The pre-tokenizer name llama.cpp knows the vocabulary by: the source GGUF's when there is one, else GPT-2's.

    llama.cpp picks its text-splitting rules by this name (and refuses names
    it does not know); the model's source GGUF file, recorded in the manifest
    as ``... gguf:PATH ...``, has the right one.
    """
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
            pass  # the source moved or is damaged: GPT-2's rules are the generic byte-level BPE ones
    return "gpt-2"

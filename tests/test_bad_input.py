"""Bad input gets one clear message naming the problem and the fix: exit code 2 for usage
errors, 1 for runtime failures, and no traceback unless --debug.

The matrix runs the real CLI (click's CliRunner, in-process) on a tiny model directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _run(model: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "-o", str(out), "--set", "evaluate_pretrained=false",
            "--set", "trainer.progress=false", "--set", "trainer.max_steps=1", "--set", "eval.latency=false", *extra]


def _gguf(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _damaged(artifact: Path, tmp: Path, edit) -> Path:
    copy = tmp / "artifact"
    shutil.copytree(artifact, copy)
    edit(copy)
    return copy


def _edit_manifest(**changes):
    def edit(path: Path):
        manifest = json.loads((path / "manifest.json").read_text())
        for key, value in changes.items():
            if key == "torch":
                manifest["versions"]["torch"] = value
            else:
                manifest[key] = value
        (path / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _write(tmp: Path, name: str, data: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


# Each case: (id, build(tmp, model_dir, artifact) -> CLI args, exit code, fragments the message must hold)
CASES = [
    ("unknown-component", lambda t, m, a: _run(m, t / "o", "--quantizer", "gptq"), 2,
     ["unknown quantizer 'gptq'. Known quantizers: dynamic", "Run 'ftq plugins'"]),
    ("unknown-component-quantize-cmd", lambda t, m, a: ["quantize", str(m), "-q", "awq", "-o", str(t / "o")], 2,
     ["unknown quantizer 'awq'. Known quantizers: dynamic"]),
    ("mistyped-keys-all-at-once", lambda t, m, a: ["run", "-c", str(_write(t, "run.toml",
        'modle = "x"\n[trainer]\nmax_step = 3\nlr = "fast"\n[eval]\nmax_block = 2\n'))], 2,
     ["has 4 problems", "unknown key 'modle' (did you mean 'model'?)", "[eval] unknown key 'max_block' (did you mean 'max_blocks'?)",
      "[trainer] causal-lm: unknown key 'max_step' (did you mean 'max_steps'?)", "[trainer] causal-lm: lr: must be a number, got 'fast'"]),
    ("wrong-type-and-range", lambda t, m, a: _run(m, t / "o", "--set", "trainer.batch_size=two", "--set", "trainer.lr=5",
        "--set", "dataset.eval_fraction=2", "--set", "eval.latency=maybe"), 2,
     ["has 4 problems", "batch_size: must be an integer, got 'two'", "lr must be <= 1 (typical: 1e-5 to 1e-3), got 5.0",
      "eval_fraction must be between 0 and 1, got 2.0", "latency: must be true or false, got 'maybe'"]),
    ("non-finite-number", lambda t, m, a: _run(m, t / "o", "--set", "trainer.weight_decay=nan"), 2,
     ["weight_decay: must be a finite number, got 'nan'"]),
    ("missing-model-path", lambda t, m, a: _run(t / "no-such-model", t / "o"), 2,
     ["no model at", "it is not a bundled model (smollm2), and no file or directory of that name exists"]),
    ("model-dir-with-only-pickle-weights", lambda t, m, a: _run(_pickle_only_model(t, m), t / "o"), 2,
     ["has no .safetensors weights (it has pytorch_model.bin: pickle files", "never unpickles"]),
    ("gguf-unsupported-architecture", lambda t, m, a: _run(_gguf(t / "bert.gguf", "bert"), t / "o"), 2,
     ["holds a bert model, an architecture transformers cannot load from GGUF (supported: ", "llama"]),
    ("gguf-damaged", lambda t, m, a: _run(_write(t, "junk.gguf", b"GGUF-but-not-really"), t / "o"), 2,
     ["junk.gguf is not a readable GGUF file (", "it may be truncated or another format"]),
    ("empty-dataset", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "empty.txt", ""))), 2,
     ["empty.txt is empty (0 bytes); put some text in it"]),
    ("blank-dataset", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "blank.txt", "\n\n   \n\n"))), 2,
     ["blank.txt holds no text (every line is empty)"]),
    ("dataset-shorter-than-a-block", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "short.txt", "To be, or not to be."))), 2,
     ["the training split of short.txt has", "tokens, fewer than one block of 256. Add more text."]),
    ("non-utf8-text", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "latin.txt", "caf\xe9 d\xe9j\xe0 vu\n".encode("latin-1") * 40))), 2,
     ["latin.txt is not valid UTF-8: byte 0xe9 at offset 3 (line 1)", "iconv -f latin1 -t utf-8"]),
    ("jsonl-missing-column", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "rows.jsonl", '{"body": "a line of text"}\n' * 20))), 2,
     ["rows.jsonl has no column 'text'; its columns are body. Set text_column to one of them (e.g. --set dataset.text_column=body)."]),
    ("csv-missing-column", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "rows.csv", "title,body\n" + "a,some text\n" * 20)),
        "--set", "dataset.text_column=content"), 2,
     ["rows.csv has no column 'content'; its columns are title, body."]),
    ("missing-data-file", lambda t, m, a: _run(m, t / "o", "--data", str(t / "nope.txt")), 2,
     ["nope.txt' does not exist; set dataset path to a .txt, .jsonl or .csv file"]),
    ("calibration-zero-batches", lambda t, m, a: _run(m, t / "o", "--set", "calibration_batches=0"), 2,
     ["calibration_batches must be >= 1, got 0"]),
    ("flags-contradict-config", lambda t, m, a: ["run", "-c", str(_write(t, "run.toml", 'quantizer = "dynamic"\n[trainer]\nmax_steps = 5\n')),
        "--quantizer", "static", "--max-steps", "7"], 2,
     ["the command line has 2 problems", "--quantizer 'static' contradicts", "which sets quantizer.name = 'dynamic'",
      "override the file on purpose with --set quantizer.name=static", "--max-steps 7 contradicts"]),
    ("config-file-missing", lambda t, m, a: ["run", "-c", str(t / "nope.toml")], 2, ["config file", "nope.toml' does not exist"]),
    ("config-file-not-toml", lambda t, m, a: ["run", "-c", str(_write(t, "bad.toml", "[trainer\nmax_steps = 3\n"))], 2,
     ["has 1 problem", "not valid TOML"]),
    ("malformed-set", lambda t, m, a: _run(m, t / "o", "--set", "trainer.max_steps"), 2,
     ["--set 'trainer.max_steps': expected SECTION.KEY=VALUE"]),
    ("artifact-other-engine", lambda t, m, a: ["generate", str(_damaged(a, t, _edit_manifest(engine="sme-arm64"))), "-p", "hi"], 1,
     ["packed for the 'sme-arm64' quantized engine, which this torch does not have (available:", "Re-quantize on this machine"]),
    ("artifact-newer-format", lambda t, m, a: ["generate", str(_damaged(a, t, _edit_manifest(format_version=99))), "-p", "hi"], 1,
     ["was written by a newer ftq (artifact format 99, this ftq reads up to 1); upgrade ftq"]),
    ("artifact-missing-file", lambda t, m, a: ["generate", str(_damaged(a, t, lambda p: (p / "tokenizer.json").unlink())), "-p", "hi"], 1,
     ["failed verification: tokenizer.json is missing. Do not use it; write it again from the source model."]),
    ("artifact-tampered-file", lambda t, m, a: ["eval", str(_damaged(a, t, lambda p: _flip_byte(p / "model.safetensors")))], 1,
     ["failed verification: model.safetensors does not match its checksum (changed after saving)"]),
    ("artifact-added-file", lambda t, m, a: ["generate", str(_damaged(a, t, lambda p: _write(p, "extra.json", "{}"))), "-p", "hi"], 1,
     ["failed verification: extra.json is not recorded in the manifest (added after saving)"]),
    ("artifact-interrupted-save", lambda t, m, a: ["generate", str(_damaged(a, t, lambda p: (p / "manifest.json").unlink())), "-p", "hi"], 1,
     ["is not a complete ftq artifact: manifest.json is missing"]),
    ("artifact-missing-dir", lambda t, m, a: ["generate", str(t / "nothing"), "-p", "hi"], 1,
     ["no artifact at", "the directory does not exist"]),
    ("eval-on-a-file", lambda t, m, a: ["eval", str(a / "model.safetensors")], 1,
     ["model.safetensors is a file, not an artifact: an artifact is the directory that holds manifest.json"]),
    ("empty-prompt", lambda t, m, a: ["generate", str(a), "-p", ""], 2, ["the prompt is empty; give the text to continue"]),
    ("truncated-safetensors-in-model-dir", lambda t, m, a: _run(_truncated_model(t, m), t / "o"), 2,
     ["a .safetensors file there is truncated or damaged", "Copy or save the model again"]),
    ("model-dir-missing-weights", lambda t, m, a: _run(_model_missing_a_weight(t, m), t / "o"), 2,
     ["do not fit the model's config: 1 weight(s) missing (would be random): model.layers.0.mlp.up_proj.weight",
      "will not fine-tune or quantize a partly random model"]),
    ("model-is-an-artifact", lambda t, m, a: _run(a, t / "o"), 2,
     ["is an ftq artifact (quantized with 'dynamic'), not a float model", "Point --model at the float model it was made from",
      "ftq eval"]),
    ("nul-bytes-in-text", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "nul.txt", "line one\nline two\x00\x00\n"))), 2,
     ["nul.txt holds a NUL byte at offset 17 (line 2): it is a binary file or UTF-16 text"]),
    ("jsonl-malformed-line", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "bad.jsonl",
        '{"text": "fine"}\n{"text": "also fine"}\n{"text": "broken\n{"text": "fine"}\n'))), 2,
     ["bad.jsonl line 3 is not valid JSON (Invalid control character at column 17)", "Fix or delete that line."]),
    ("jsonl-no-string-text", lambda t, m, a: _run(m, t / "o", "--data", str(_write(t, "ints.jsonl", '{"text": 5}\n{"text": null}\n'))), 2,
     ["ints.jsonl holds no text: no row has a non-empty string 'text': line 1 (a int, not text), line 2 (a NoneType, not text)"]),
    ("data-path-is-a-directory", lambda t, m, a: _run(m, t / "o", "--data", str(t)), 2,
     ["is a directory; point it at one .txt, .jsonl or .csv file in it"]),
    ("flag-and-set-disagree", lambda t, m, a: _run(m, t / "o", "--quantizer", "dynamic", "--set", "quantizer.name=static"), 2,
     ["--quantizer dynamic and --set quantizer.name=static give quantizer.name two values; keep one of them"]),
    ("quoted-number-and-string-for-a-list", lambda t, m, a: ["run", "-c", str(_write(t, "quoted.toml",
        f'model = "{m}"\n[trainer]\nmax_steps = "4"\n[quantizer]\nname = "dynamic"\nkeep_float = "lm_head"\n'))], 2,
     ["max_steps: must be an integer, got the string '4'; write the number without quotes",
      'keep_float: must be a list of str, got the string "lm_head"; write a list: ["lm_head"]']),
    ("output-holds-a-foreign-model-dir", lambda t, m, a: _run(m, _foreign_output(t)), 2,
     ["does not hold an ftq artifact, so ftq will not replace it"]),
]


def _truncated_model(tmp: Path, model_dir: Path) -> Path:
    path = tmp / "truncated-model"
    shutil.copytree(model_dir, path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return path


def _model_missing_a_weight(tmp: Path, model_dir: Path) -> Path:
    from safetensors.torch import load_file, save_file

    path = tmp / "incomplete-model"
    shutil.copytree(model_dir, path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _foreign_output(tmp: Path) -> Path:
    (tmp / "o" / "model").mkdir(parents=True)
    (tmp / "o" / "model" / "notes.txt").write_text("mine")
    return tmp / "o"


def _pickle_only_model(tmp: Path, model_dir: Path) -> Path:
    path = tmp / "pickled-model"
    shutil.copytree(model_dir, path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not even read")
    return path


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("build", "code", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_matrix(tmp_path, tiny_model_dir, artifact_dir, monkeypatch, build, code, fragments):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    monkeypatch.delenv("FTQ_DEBUG", raising=False)
    args = build(tmp_path, tiny_model_dir, artifact_dir)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    assert "Traceback" not in result.output
    error = result.output[result.output.index("Error: "):]
    for fragment in fragments:
        assert fragment in error, f"{fragment!r} not in {error!r}"
    assert not (tmp_path / "o" / "model" / "manifest.json").exists()


def test_artifact_from_another_torch_version_warns_in_one_line_and_loads(tmp_path, artifact_dir):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    damaged = _damaged(artifact_dir, tmp_path, _edit_manifest(torch="2.1.0"))
    result = CliRunner().invoke(cli, ["generate", str(damaged), "-p", "hi", "-n", "2"])
    assert result.exit_code == 0, result.output
    assert "Warning: this artifact was written with torch 2.1.0, and torch " in result.output
    assert "quantized kernels may differ. Re-quantize with this torch if outputs look wrong." in result.output
    assert "UserWarning" not in result.output


def test_artifact_for_another_available_engine_switches_with_a_warning(tmp_path, artifact_dir):
    import torch

    from ftq_core.artifacts import load_artifact
    from ftq_core.errors import FtqWarning

    other = next(e for e in torch.backends.quantized.supported_engines if e not in ("none", torch.backends.quantized.engine))
    before = torch.backends.quantized.engine
    try:
        with pytest.warns(FtqWarning, match=f"switching torch's quantized engine from {before!r} to {other!r}"):
            load_artifact(_damaged(artifact_dir, tmp_path, _edit_manifest(engine=other)))
        assert torch.backends.quantized.engine == other
    finally:
        torch.backends.quantized.engine = before


def test_calibrating_on_zero_blocks_is_a_dataset_error(tiny_llama):
    import ftq_core
    from ftq_core.errors import DatasetError

    with pytest.raises(DatasetError, match="calibration needs at least one block of data, and the dataset gave none"):
        ftq_core.calibrate(tiny_llama, [], batches=4, progress=False)


def test_flags_that_agree_with_the_file_and_set_overrides_are_accepted(tmp_path):
    from ftq_core.run_config import check_flags_against_file

    file_values = {"quantizer": "dynamic", "trainer": {"max_steps": 5}}
    flag_names = {"quantizer.name": "--quantizer"}
    check_flags_against_file(file_values, {"quantizer": {"name": "dynamic"}, "trainer": {"max_steps": 5}}, file_name="f", flag_names=flag_names)
    check_flags_against_file(file_values, {"model": "x", "dataset": {"path": "a.txt"}}, file_name="f", flag_names=flag_names)


def test_set_overrides_the_config_file_explicitly(tmp_path, tiny_model_dir, monkeypatch):
    """--set is the documented way to override a file value; it wins without an error."""
    from click.testing import CliRunner

    import ftq_core.pipeline as pipeline
    from ftq_core.cli import cli

    seen = {}
    monkeypatch.setattr(pipeline, "run", lambda config: seen.setdefault("config", config) and None)
    config = _write(tmp_path, "run.toml", 'quantizer = "dynamic"\n[trainer]\nmax_steps = 5\n')
    CliRunner().invoke(cli, ["run", "-c", str(config), "--set", "trainer.max_steps=7", "--set", "calibration_batches=3"])
    assert seen["config"].trainer.options["max_steps"] == "7"
    assert seen["config"].calibration_batches == 3


def test_traceback_only_with_debug(tmp_path):
    env = dict(os.environ, FTQ_LOAD_PLUGINS="")
    env.pop("FTQ_DEBUG", None)
    args = [sys.executable, "-m", "ftq_core.cli"]
    plain = subprocess.run([*args, "generate", str(tmp_path / "nothing"), "-p", "x"], env=env, capture_output=True, text=True)
    debug = subprocess.run([*args, "--debug", "generate", str(tmp_path / "nothing"), "-p", "x"], env=env, capture_output=True, text=True)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.strip() == f"Error: no artifact at {tmp_path / 'nothing'}: the directory does not exist."
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "ftq_core.errors.ArtifactError: no artifact at" in debug.stderr


def test_prompt_longer_than_the_context_is_cut_with_a_warning(tmp_path, artifact_dir):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    prompt = " ".join(["the river rose over the fields"] * 200)  # far more than the tiny model's 256 positions
    result = CliRunner().invoke(cli, ["generate", str(artifact_dir), "-p", prompt, "-n", "6"])
    assert result.exit_code == 0, result.output
    assert "Warning: the prompt has" in result.output
    assert "the model's context is 256: with 6 new tokens only the last 250 prompt tokens fit, so the first" in result.output


def test_more_new_tokens_than_the_context_is_a_usage_error(artifact_dir):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(artifact_dir), "-p", "hello", "-n", "300"])
    assert result.exit_code == 2 and "does not fit the model's context of 256 tokens" in result.output


def test_chat_without_a_template_says_so(artifact_dir):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    result = CliRunner().invoke(cli, ["generate", str(artifact_dir), "-p", "hello", "-n", "2", "--chat"])
    assert result.exit_code == 0, result.output
    assert "tokenizer has no chat template; --chat is ignored" in result.output


def test_jsonl_rows_without_text_are_counted_and_dropped(tmp_path):
    from ftq_core.errors import FtqWarning
    from ftq_plugins.datasets.text import TextDataset, TextDatasetConfig

    rows = [json.dumps({"text": f"row {i} has some text"}) for i in range(6)]
    rows[1] = json.dumps({"text": 7})
    rows[4] = json.dumps({"text": None})
    rows.insert(3, json.dumps({"body": "wrong field"}))
    path = _write(tmp_path, "mixed.jsonl", "\n".join(rows) + "\n")
    with pytest.warns(FtqWarning, match=r"mixed.jsonl: 3 of 7 rows have no usable 'text' text and were dropped: "
                                        r"line 2 \(a int, not text\), line 4 \(no such field\), line 6 \(a NoneType"):
        texts = TextDataset(TextDatasetConfig(path=str(path))).read_documents()
    assert texts == ["row 0 has some text", "row 2 has some text", "row 3 has some text", "row 5 has some text"]


def test_json_array_file_still_reads_through_datasets(tmp_path):
    from ftq_plugins.datasets.text import TextDataset, TextDatasetConfig

    path = _write(tmp_path, "rows.json", json.dumps([{"text": "first row"}, {"text": "second row"}]))
    assert TextDataset(TextDatasetConfig(path=str(path))).read_documents() == ["first row", "second row"]

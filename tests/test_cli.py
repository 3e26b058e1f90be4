"""The ``ftq`` command line over a tiny model directory."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from ftq_testing import REPO, make_tiny_llama

from ftq_core.cli import cli


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny-model"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_run_eval_generate_quantize(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = invoke(
        "run", "--model", str(tiny_model_dir), "-o", str(out), "--max-steps", "2",
        "--set", "dataset.block_size=32", "--set", "trainer.progress=false", "--set", "trainer.batch_size=2",
        "--set", "eval.max_blocks=2", "--set", "eval.repeats=1", "--set", "eval.decode_tokens=4", "--set", "eval.prefill_tokens=16",
    )
    assert result.exit_code == 0, result.output
    assert "| int8 dynamic |" in result.output and (out / "model" / "manifest.json").is_file()

    evaluated = invoke("eval", str(out / "model"), "--no-latency")
    assert evaluated.exit_code == 0 and "| dynamic |" in evaluated.output
    assert "speed-up" not in evaluated.output and "size vs fp32" not in evaluated.output  # one model: no ratios to itself
    of_run_dir = invoke("eval", str(out), "--no-latency", "--set", "eval.max_blocks=1")  # the run directory: its model/
    assert of_run_dir.exit_code == 0 and "| dynamic |" in of_run_dir.output

    generated = invoke("generate", str(out / "model"), "-p", "River level", "-n", "5")
    assert generated.exit_code == 0 and generated.output.strip()

    quantized = invoke("quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--set", "keep_float=lm_head")
    assert quantized.exit_code == 0 and "quantized 15/21 layers" in quantized.output  # 14 Linear + the int8 embedding


def test_config_file_with_problems_exits_2_listing_all(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('modle = "x"\n[trainer]\nname = "causal-lm"\nmax_stepz = 3\n[quantizer]\nname = "nope"\n')
    result = CliRunner().invoke(cli, ["run", "-c", str(config), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "3 problems" in result.output
    assert "did you mean 'model'" in result.output and "did you mean 'max_steps'" in result.output
    assert "Known quantizers: dynamic" in result.output
    assert "Traceback" not in result.output


def test_missing_model_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["run", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no model at" in result.output and "bundled model" in result.output


def test_plugins_lists_builtins_as_json():
    result = invoke("plugins", "--all", "--json")
    listed = {entry["name"]: entry for entry in json.loads(result.output)}
    assert listed["dynamic_quantizer"]["components"] == {"quantizer": ["dynamic"]}
    assert listed["text_dataset"]["kind"] == "dataset" and listed["text_dataset"]["source"] == "built-in"


def test_eval_takes_dataset_options_like_run(tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    assert invoke("quantize", str(tiny_model_dir), "-o", str(out)).exit_code == 0
    rows = tmp_path / "rows.jsonl"
    text = (REPO / "plugins" / "data" / "sample.txt").read_text().split("\n\n")
    rows.write_text("\n".join(json.dumps({"body": t}) for t in text if t.strip()) + "\n")
    done = CliRunner().invoke(cli, ["eval", str(out), "--data", str(rows), "--set", "dataset.text_column=body",
                                    "--set", "dataset.block_size=32", "--no-latency"])
    assert done.exit_code == 0, done.output
    wrong = CliRunner().invoke(cli, ["eval", str(out), "--set", "trainer.max_steps=3"])
    assert wrong.exit_code == 2 and "ftq eval takes dataset.KEY=VALUE and eval.KEY=VALUE only" in wrong.output

"""The ``ftq`` command line: each command parses, builds a config, calls one API function, prints.

Errors meant for users (:class:`ftq_core.errors.FtqError`) print as one
paragraph with exit code 2 (usage) or 1 (runtime); ``--debug`` shows the
traceback.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from .cli_errors import user_errors
from .errors import UsageError

__all__ = ["cli", "main"]


def _show_progress_messages() -> None:
    """Print the pipeline's INFO messages (only ftq's own logger, not the libraries')."""
    import logging

    logger = logging.getLogger("ftq")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


#: Which ``ftq run`` flag sets which config key (for contradiction messages).
_RUN_FLAGS = {
    "model": "--model", "output_dir": "--output-dir", "resume": "--resume", "dataset.name": "--dataset",
    "dataset.path": "--data", "trainer.name": "--trainer", "trainer.max_steps": "--max-steps",
    "quantizer.name": "--quantizer",
}


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    """``section.key=value`` pairs into a nested mapping."""
    tree: dict[str, Any] = {}
    problems = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. trainer.max_steps=10")
            continue
        *parents, leaf = key.strip().split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    if problems:
        from .errors import ConfigError

        raise ConfigError(problems, where="command line")
    return tree


def _without_nproc(args: list[str]) -> list[str]:
    """``args`` without ``--nproc N`` / ``--nproc=N``, for the processes torchrun starts."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    return kept


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        elif isinstance(value, dict) and isinstance(merged.get(key), str):
            merged[key] = _merge({"name": merged[key]}, value)
        else:
            merged[key] = value
    return merged


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option(
    "--disable-plugin", "disabled", multiple=True, metavar="NAME",
    help="Do not load this plugin for this command (repeatable; entry-point or package name).",
)
@click.version_option(package_name="ftq", prog_name="ftq")
def cli(debug: bool, disabled: tuple[str, ...]) -> None:
    """Fine-tune and quantize LLMs in PyTorch, with plugins for datasets, trainers and quantizers.

    Start with `ftq run` (fine-tune the bundled SmolLM2 on the bundled sample,
    quantize to int8, evaluate, save) and `ftq plugins`.

    Plugins: `ftq install NAME` adds one, `ftq plugins` lists what is loaded
    (plugins may add commands of their own). FTQ_LOAD_PLUGINS="" loads no
    third-party plugin, FTQ_LOAD_PLUGINS=a,b only those.
    """
    if debug:
        os.environ["FTQ_DEBUG"] = "1"
    _show_progress_messages()
    from .cli_plugins import apply_disabled

    apply_disabled(disabled)


@cli.command()
@click.option("-c", "--config", "config_file", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--model", help="Bundled model name (smollm2), .gguf file, or HF model directory.")
@click.option("--dataset", help="Dataset component name (default: text).")
@click.option("--data", "data_path", help="Data file for the dataset (.txt, .jsonl, .csv).")
@click.option("--trainer", help="Trainer component name; 'none' skips fine-tuning.")
@click.option("--max-steps", type=int, help="Fine-tuning steps.")
@click.option("--quantizer", help="Quantizer component name (default: dynamic).")
@click.option("-o", "--output-dir", help="Where the artifact and report go (default: ftq-out).")
@click.option("--resume", is_flag=True, default=None, help="Continue training from the last checkpoint.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Any option, e.g. quantizer.keep_float=lm_head.")
@click.option("--nproc", type=click.IntRange(1), help="Train data-parallel in N processes (one per GPU) started with torchrun.")
@user_errors
def run(config_file, model, dataset, data_path, trainer, max_steps, quantizer, output_dir, resume, sets, nproc) -> None:
    """Fine-tune → quantize → evaluate → save, and print the report.

    Under torchrun, or with --nproc N, training is data-parallel (DDP): each
    process takes its share of every batch, and rank 0 writes the results.
    """
    if nproc is not None and nproc > 1:
        from .distributed import launch

        sys.exit(launch(nproc, _without_nproc(sys.argv[1:])))
    from .pipeline import run as run_pipeline
    from .run_config import check_flags_against_file, load_toml, run_config_from_mapping

    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    flags: dict[str, Any] = {}
    for key, value in (("model", model), ("output_dir", output_dir), ("resume", resume)):
        if value is not None:
            flags[key] = value
    for section, name in (("dataset", dataset), ("trainer", trainer), ("quantizer", quantizer)):
        if name is not None:
            flags[section] = {"name": name}
    if data_path is not None:
        flags.setdefault("dataset", {})["path"] = data_path
    if max_steps is not None:
        flags.setdefault("trainer", {})["max_steps"] = max_steps
    check_flags_against_file(values, flags, file_name=str(config_file), flag_names=_RUN_FLAGS)
    values = _merge(_merge(values, flags), _parse_sets(sets))
    from .plugins import get_plugins

    result = run_pipeline(run_config_from_mapping(values, plugins=get_plugins()))
    if result.rank != 0:  # rank 0 prints the report
        return
    click.echo("")
    click.echo(result.table())
    click.echo(f"\nartifact: {result.artifact_dir}\nreport: {', '.join(str(p) for p in result.report_paths.values())}")


@cli.command()
@click.argument("model")
@click.option("-q", "--quantizer", default="dynamic", show_default=True, help="Quantizer component name.")
@click.option("-o", "--output-dir", required=True, help="Where the artifact goes.")
@click.option("--data", "data_path", help="Calibration text file (for quantizers that calibrate).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Quantizer option, e.g. keep_float=lm_head.")
@user_errors
def quantize(model, quantizer, output_dir, data_path, sets) -> None:
    """Quantize MODEL without fine-tuning and save it."""
    from dataclasses import asdict

    from .artifacts import save_artifact
    from .models import load_model
    from .pipeline import quantize as quantize_model
    from .plugins import get_plugins
    from .preflight import check_free_space

    options = _parse_sets(sets)
    # Validate the quantizer's options before the (slow) model load.
    component = get_plugins().get("quantizer", quantizer)
    needs_calibration = component.create(component.make_config(options)).needs_calibration
    loaded = load_model(model)
    check_free_space(output_dir, loaded.model, None)  # before quantizing, not after
    calibration = None
    if needs_calibration:
        dataset_component = get_plugins().get("dataset", "text")
        dataset = dataset_component.create(dataset_component.make_config({"path": data_path} if data_path else {}))
        calibration = dataset.build(loaded.tokenizer)
    result = quantize_model(loaded.model, quantizer, options, calibration_data=calibration, tokenizer=loaded.tokenizer)
    manifest = {
        "method": quantizer,
        "quantizer_options": result.options,
        "engine": result.engine,
        "layers": [asdict(layer) for layer in result.layers],
        "source_model": loaded.source,
    }
    path = save_artifact(result.model, loaded.tokenizer, output_dir, manifest=manifest)
    done = sum(layer.quantized for layer in result.layers)
    click.echo(f"quantized {done}/{len(result.layers)} layers with {quantizer}; saved to {path}")


@cli.command(name="eval")
@click.argument("artifact", type=click.Path())
@click.option("--data", "data_path", help="Held-out text file (default: the bundled sample's held-out split).")
@click.option("--no-latency", is_flag=True, help="Skip prefill/decode timing.")
@user_errors
def eval_command(artifact, data_path, no_latency) -> None:
    """Evaluate a saved ARTIFACT: perplexity, size, prefill and decode speed."""
    from .evaluation import EvalSettings
    from .pipeline import evaluate_artifact
    from .report import markdown_table

    row = evaluate_artifact(artifact, settings=EvalSettings(latency=not no_latency), dataset_options={"path": data_path} if data_path else None)
    click.echo(markdown_table([row]))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@click.option("-n", "--max-new-tokens", default=40, show_default=True, type=click.IntRange(1, 4096), help="Tokens to generate.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@user_errors
def generate(artifact, prompt, max_new_tokens, chat) -> None:
    """Continue PROMPT with a saved ARTIFACT (greedy)."""
    from .generation import greedy_generate
    from .pipeline import load

    loaded = load(artifact)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UsageError(f"{artifact} has no tokenizer files; it cannot turn text into tokens")
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt")
    output = greedy_generate(
        loaded.model, inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id,
    )
    click.echo(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))


from .cli_plugins import add_plugin_commands, attach_plugin_commands  # noqa: E402 - needs `cli` defined

add_plugin_commands(cli)


def main() -> None:
    """Entry point of the ``ftq`` script."""
    # Plugin commands are looked up only when the command asked for is not a
    # built-in one, so `ftq --help` and `ftq run` never pay for it.
    attach_plugin_commands(cli, sys.argv[1:])
    cli(prog_name="ftq")


if __name__ == "__main__":
    main()

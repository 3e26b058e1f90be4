"""The ``ftq`` command line: each command parses, builds a config, calls one API function, prints.

Errors meant for users (:class:`ftq_core.errors.FtqError`) print as one
paragraph with exit code 2 (usage) or 1 (runtime); ``--debug`` shows the
traceback.  Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from .cli_errors import user_errors
from .configs import CommandLineText
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
    "quantizer.name": "--quantizer", "adapter.name": "--adapter",
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
        node[leaf] = CommandLineText(value)  # text to parse, unlike a string in a config file
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
    if not os.environ.get("FTQ_DEBUG"):
        from .library_noise import quiet_libraries

        quiet_libraries()  # before any command imports transformers or datasets
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
@click.option("--adapter", help="Adapter component name (lora): quantize first, then train only the adapter over the "
                                "int8 model (default: none).")
@click.option("-o", "--output-dir", help="Where the artifact and report go (default: ftq-out).")
@click.option("--resume", is_flag=True, default=None, help="Continue training from the last checkpoint.")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE", help="Any option, e.g. quantizer.keep_float=lm_head.")
@click.option("--nproc", type=click.IntRange(1), help="Train data-parallel in N processes (one per GPU) started with torchrun.")
@user_errors
def run(config_file, model, dataset, data_path, trainer, max_steps, quantizer, adapter, output_dir, resume, sets,
        nproc) -> None:
    """Fine-tune → quantize → evaluate → save, and print the report.

    With --adapter: quantize → train the adapter over the int8 model →
    evaluate → save (the int8 base and the adapter side by side).

    Under torchrun, or with --nproc N, training is data-parallel (DDP): each
    process takes its share of every batch, and rank 0 writes the results.
    """
    if nproc is not None and nproc > 1:
        from .distributed import launch

        sys.exit(launch(nproc, _without_nproc(sys.argv[1:])))
    from .pipeline import run as run_pipeline
    from .run_config import check_flags_against_file, check_flags_against_sets, load_toml, run_config_from_mapping

    values: dict[str, Any] = load_toml(config_file) if config_file else {}
    flags: dict[str, Any] = {}
    for key, value in (("model", model), ("output_dir", output_dir), ("resume", resume)):
        if value is not None:
            flags[key] = value
    for section, name in (("dataset", dataset), ("trainer", trainer), ("quantizer", quantizer), ("adapter", adapter)):
        if name is not None:
            flags[section] = {"name": name}
    if data_path is not None:
        flags.setdefault("dataset", {})["path"] = data_path
    if max_steps is not None:
        flags.setdefault("trainer", {})["max_steps"] = max_steps
    check_flags_against_file(values, flags, file_name=str(config_file), flag_names=_RUN_FLAGS)
    overrides = _parse_sets(sets)
    check_flags_against_sets(flags, overrides, flag_names=_RUN_FLAGS)
    values = _merge(_merge(values, flags), overrides)
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
@click.option("--layerwise", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Read and quantize one decoder layer at a time (on), the whole float model (off), or whichever "
                   "fits in memory (auto). Layer by layer, a killed run resumes at the next layer.")
@user_errors
def quantize(model, quantizer, output_dir, data_path, sets, layerwise) -> None:
    """Quantize MODEL without fine-tuning and save it."""
    from .pipeline import quantize_to_artifact

    path, result = quantize_to_artifact(model, output_dir, quantizer, _parse_sets(sets), data_path=data_path,
                                        layerwise=layerwise)
    done = sum(layer.quantized for layer in result.layers)
    click.echo(f"quantized {done}/{len(result.layers)} layers with {quantizer}; saved to {path}")


@cli.command(name="export")
@click.argument("artifact", type=click.Path())
@click.option("--format", "format_name", default="hf", show_default=True,
              help="Exporter component (`ftq plugins --options` lists them and their options).")
@click.option("-o", "--output-dir", required=True, help="Where the export goes (must not exist, or be empty).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Exporter option, e.g. dtype=bfloat16.")
@user_errors
def export_command(artifact, format_name, output_dir, sets) -> None:
    """Write ARTIFACT (or a run's output directory) in a format other runtimes read, e.g. a Hugging Face directory."""
    from .pipeline import export

    written = export(artifact, output_dir, format_name, _parse_sets(sets))
    click.echo(f"exported {artifact} to {output_dir}: {written}")


@cli.command(name="eval")
@click.argument("artifact", type=click.Path())
@click.option("--dataset", "dataset_name", default="text", show_default=True, help="Dataset component for the held-out data.")
@click.option("--data", "data_path", help="Held-out text file (default: the bundled sample's held-out split).")
@click.option("--set", "sets", multiple=True, metavar="SECTION.KEY=VALUE",
              help="A dataset or eval option, e.g. dataset.text_column=body or eval.max_blocks=4.")
@click.option("--no-latency", is_flag=True, help="Skip prefill/decode timing.")
@click.option("--no-compile", is_flag=True, help="Time on the eager loops, not the fused int8 decoder.")
@user_errors
def eval_command(artifact, dataset_name, data_path, sets, no_latency, no_compile) -> None:
    """Evaluate a saved ARTIFACT (or a run's output directory): perplexity, size, prefill and decode speed."""
    from .configs import build_config
    from .errors import ConfigError
    from .evaluation import EvalSettings
    from .pipeline import evaluate_artifact
    from .report import markdown_table

    options = _parse_sets(sets)
    unknown = sorted(set(options) - {"dataset", "eval"})
    if unknown:
        raise ConfigError([f"--set {name}.…: ftq eval takes dataset.KEY=VALUE and eval.KEY=VALUE only" for name in unknown],
                          where="the command line")
    dataset_options = dict(options.get("dataset", {}))
    if data_path:
        dataset_options["path"] = data_path
    flags = {**({"latency": False} if no_latency else {}), **({"compile": False} if no_compile else {})}
    settings = build_config(EvalSettings, {**options.get("eval", {}), **flags}, where="eval options")
    row = evaluate_artifact(artifact, settings=settings, dataset=dataset_name, dataset_options=dataset_options)
    click.echo(markdown_table([row]))


@cli.command()
@click.argument("artifact", type=click.Path())
@click.option("-p", "--prompt", required=True, help="Text to continue.")
@click.option("-n", "--max-new-tokens", default=40, show_default=True, type=click.IntRange(1, 4096), help="Tokens to generate.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--no-compile", is_flag=True, help="Decode on the eager loop, not the fused int8 decoder.")
@user_errors
def generate(artifact, prompt, max_new_tokens, chat, no_compile) -> None:
    """Continue PROMPT with a saved ARTIFACT (greedy)."""
    from .generation import choose_loop, greedy_generate
    from .pipeline import load

    if not prompt.strip():
        raise UsageError('the prompt is empty; give the text to continue, e.g. -p "Once upon a time"')
    loaded = load(artifact)
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UsageError(f"{artifact} has no tokenizer files; it cannot turn text into tokens")
    text = _chat_prompt(tokenizer, prompt, artifact) if chat else prompt
    inputs = tokenizer(text, return_tensors="pt")
    input_ids, attention_mask = _fit_context(loaded.model, inputs["input_ids"], inputs.get("attention_mask"), max_new_tokens)
    max_length = input_ids.shape[1] + max_new_tokens
    loop = choose_loop(loaded.model, attention_mask=attention_mask, compile=not no_compile, max_length=max_length)
    note = _loop_note(loaded.model, loop, attention_mask, not no_compile, max_length)
    click.echo(f"decode loop: {loop.value} ({note})", err=True)
    output = greedy_generate(
        loaded.model, input_ids, attention_mask=attention_mask,
        max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, loop=loop,
    )
    click.echo(tokenizer.decode(output[0][input_ids.shape[1]:], skip_special_tokens=True))


def _loop_note(model, loop, attention_mask, compile: bool, max_length: int) -> str:
    """Why ``loop`` runs: what it is, or why the faster loops before it cannot."""
    from .generation import DecodeLoop, loop_reasons

    if loop is DecodeLoop.FUSED:
        return "fused int8 decoder"
    notes = []
    reasons = loop_reasons(model, attention_mask=attention_mask, compile=compile, max_length=max_length)
    for other, reason in reasons.items():  # fastest first
        if other is loop:
            break
        notes.append(f"not {other.value}: {reason}")
    return "; ".join(notes)


def _chat_prompt(tokenizer, prompt: str, artifact) -> str:
    """``prompt`` as one user turn of the tokenizer's chat template (rendered in a bounded Jinja sandbox)."""
    import warnings

    from .chat_template import render_chat
    from .errors import FtqWarning

    if not getattr(tokenizer, "chat_template", None):
        warnings.warn(f"{artifact}'s tokenizer has no chat template; --chat is ignored and the prompt is used as it is",
                      FtqWarning, stacklevel=2)
        return prompt
    return render_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True, where=str(artifact))


def _fit_context(model, input_ids, attention_mask, max_new_tokens: int):
    """Keep the prompt's last tokens if prompt + new tokens exceed the model's context, and say so."""
    import warnings

    from .errors import FtqWarning

    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return input_ids, attention_mask
    if max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} tokens; "
                         f"ask for fewer than {context}")
    room = context - max_new_tokens
    length = input_ids.shape[1]
    if length <= room:
        return input_ids, attention_mask
    warnings.warn(
        f"the prompt has {length} tokens and the model's context is {context}: with {max_new_tokens} new tokens "
        f"only the last {room} prompt tokens fit, so the first {length - room} were cut",
        FtqWarning, stacklevel=2,
    )
    mask = attention_mask[:, -room:] if attention_mask is not None else None
    return input_ids[:, -room:], mask


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

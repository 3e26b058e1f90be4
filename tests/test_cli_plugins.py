"""`ftq plugins`, `ftq install`, `ftq uninstall`, `--disable-plugin` and plugin subcommands."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from plugin_fakes import QUANTIZER_PLUGIN, write_distribution

from ftq_core import cli as cli_module
from ftq_core import installer
from ftq_core.cli_plugins import _split_argv
from ftq_core.plugins import BUILTIN_PLUGINS

BUILTINS = set(BUILTIN_PLUGINS)


def invoke(*args: str):
    return CliRunner().invoke(cli_module.cli, list(args), prog_name="ftq")


def test_plugins_json_all_lists_builtins_with_kind_version_and_code():
    result = invoke("plugins", "--json", "--all")
    assert result.exit_code == 0, result.output
    infos = {info["name"]: info for info in json.loads(result.output)}
    assert set(infos) == BUILTINS
    dynamic = infos["dynamic_quantizer"]
    assert dynamic["kind"] == "quantizer" and dynamic["status"] == "loaded"
    assert dynamic["components"] == {"quantizer": ["dynamic"]}
    assert dynamic["source"] == "built-in" and dynamic["distribution"] == "ftq"
    assert dynamic["version"] == importlib.metadata.version("ftq")
    assert dynamic["location"].endswith("quantizers/dynamic.py")
    assert infos["module_codecs"]["kind"] == "other" and infos["module_codecs"]["codecs"]


def test_plugins_text_hides_builtins_and_says_why_nothing_third_party_shows():
    result = invoke("plugins")
    assert result.exit_code == 0
    assert "dynamic_quantizer" not in result.output
    assert "FTQ_LOAD_PLUGINS is set and empty" in result.output  # the test environment turns autoload off
    assert f"{len(BUILTINS)} built-in plugins not shown" in result.output
    text = invoke("plugins", "--all").output
    assert "quantizer: dynamic — int8 weights" in text and "from: built-in ftq_plugins.quantizers.dynamic" in text


def test_disable_plugin_flag_hides_a_plugin_for_one_command():
    result = invoke("--disable-plugin", "dynamic_quantizer", "plugins", "--json")
    (info,) = json.loads(result.output)  # shown without --all because it was disabled
    assert info["name"] == "dynamic_quantizer" and info["status"] == "disabled"
    result = invoke("--disable-plugin", "dynamic_quantizer", "run", "--model", "nowhere", "--quantizer", "dynamic")
    assert result.exit_code == 2
    assert "unknown quantizer 'dynamic'" in result.output


def test_disable_plugin_with_an_unknown_name_warns():
    result = invoke("--disable-plugin", "no-such-plugin", "plugins")
    assert result.exit_code == 0
    assert "--disable-plugin no-such-plugin: no plugin of that name" in result.output


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run"], ("run", [])),
        (["--disable-plugin", "x", "hello", "--flag"], ("hello", ["x"])),
        (["--disable-plugin=x", "--debug", "--disable-plugin", "y", "plugins"], ("plugins", ["x", "y"])),
        (["--help"], (None, [])),
    ],
)
def test_split_argv_skips_option_values(argv, expected):
    assert _split_argv(argv) == expected


def test_plugin_subcommand_through_main_and_disabled(tmp_path, monkeypatch, capsys):
    write_distribution(tmp_path, "ftq-hello", "0.1", {"hello-plugin": "hello_cmd_mod"}, {"hello_cmd_mod": '''
import click
from ftq_core import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command()
    def hello():
        """Say hello."""
        click.echo("hello from a plugin")
'''})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FTQ_LOAD_PLUGINS", "hello-plugin")
    monkeypatch.setattr(cli_module.cli, "commands", dict(cli_module.cli.commands))  # undone after the test

    def main(*argv):
        monkeypatch.setattr(sys, "argv", ["ftq", *argv])
        with pytest.raises(SystemExit) as exited:
            cli_module.main()
        return exited.value.code, capsys.readouterr()

    code, out = main("hello")
    assert code == 0 and "hello from a plugin" in out.out
    from ftq_core.plugins import reset_plugins

    reset_plugins()
    del cli_module.cli.commands["hello"]
    code, out = main("--disable-plugin", "hello-plugin", "hello")
    assert code == 2 and "No such command 'hello'" in out.err


# -- install / uninstall: the pip command line, without running pip ------------------


@pytest.fixture
def fake_pip(monkeypatch):
    """Record pip command lines (and the constraints they point at) instead of running pip."""
    calls = []

    def run(args, **kwargs):
        if "--constraint" in args:
            calls.append((args, open(args[args.index("--constraint") + 1]).read()))
        else:
            calls.append((args, None))
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(installer, "_run", run)
    monkeypatch.setattr(installer, "_plugins_in_fresh_process", lambda: [])
    return calls


def test_install_runs_this_pythons_pip_with_torch_pinned(fake_pip):
    result = invoke("install", "-U", "-q", "--no-build-isolation", "-e", "./my-plugin", "ftq-foo>=1", "./local")
    assert result.exit_code == 0, result.output
    (args, constraints), = fake_pip
    assert args[:4] == [sys.executable, "-m", "pip", "install"]
    assert ["--editable", "./my-plugin"] == args[args.index("--editable"):args.index("--editable") + 2]
    assert "--upgrade" in args and "--no-build-isolation" in args and "--quiet" in args and "--no-deps" not in args
    assert args[-2:] == ["ftq-foo>=1", "./local"]
    assert constraints.strip() == f"torch=={importlib.metadata.version('torch')}"
    assert "No new ftq plugin was registered" in result.output


@pytest.mark.parametrize("spec", ["torch", "torch>=2.5", "Torch==2.0"])
def test_install_refuses_torch(fake_pip, spec):
    result = invoke("install", spec)
    assert result.exit_code == 2
    assert "ftq never changes torch" in result.output
    assert fake_pip == []


@pytest.mark.parametrize("name", ["ftq", "torch"])
def test_uninstall_refuses_ftq_and_torch(fake_pip, name):
    result = invoke("uninstall", "-y", name)
    assert result.exit_code == 2 and f"does not uninstall {name!r}" in result.output
    assert fake_pip == []


def test_uninstall_runs_pip_uninstall(fake_pip):
    result = invoke("uninstall", "-y", "ftq-foo")
    assert result.exit_code == 0
    assert fake_pip[0][0] == [sys.executable, "-m", "pip", "uninstall", "--yes", "ftq-foo"]
    assert "No ftq plugin was removed" in result.output


def test_missing_pip_is_a_clear_error(fake_pip, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pip" else real_find_spec(name, *a))
    result = invoke("install", "ftq-foo")
    assert result.exit_code == 2 and "pip is not installed in ftq's environment" in result.output
    assert fake_pip == []


def test_pip_failure_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(installer, "_run", lambda args, **kw: subprocess.CompletedProcess(args, 1))
    result = invoke("install", "ftq-foo")
    assert result.exit_code == 1
    assert "pip install failed (exit code 1)" in result.output and "never changes torch" in result.output


def test_install_lists_what_a_new_plugin_registered(tmp_path, monkeypatch):
    """The after-install listing: a plugin that appears between the two entry-point scans is shown."""
    def run(args, **kwargs):
        write_distribution(tmp_path, "ftq-new", "2.0", {"new": "new_plugin_mod"}, {"new_plugin_mod": QUANTIZER_PLUGIN.format(name="new-q")})
        monkeypatch.syspath_prepend(str(tmp_path))
        return subprocess.CompletedProcess(args, 0)

    monkeypatch.setattr(installer, "_run", run)
    monkeypatch.setattr(installer, "_plugins_in_fresh_process", lambda: [_fresh_listing("new")])
    result = invoke("install", "ftq-new")
    assert result.exit_code == 0, result.output
    assert "Installed plugins:" in result.output
    assert "quantizer: new-q — leaves the model as it is" in result.output
    assert "entry point new_plugin_mod of ftq-new 2.0" in result.output
    assert "will not load while FTQ_LOAD_PLUGINS=''" in result.output  # the test environment hides it


def _fresh_listing(name: str) -> dict:
    from ftq_core.plugins import Plugins

    manager = Plugins(builtins=(), allow=[name])
    return next(info.to_dict() for info in manager.describe() if info.name == name)


def test_uninstall_reports_a_plugin_this_process_still_sees(fake_pip, monkeypatch):
    """An editable plugin's metadata stays on this process's sys.path after pip removes it: ask a fresh process."""
    stale = {("weight-only", "ftq-weight-only", "0.1.0")}
    monkeypatch.setattr(installer, "installed_plugin_entry_points", lambda: set(stale))
    monkeypatch.setattr(installer, "_entry_points_in_fresh_process", lambda: set())
    result = invoke("uninstall", "-y", "ftq-weight-only")
    assert result.exit_code == 0, result.output
    assert "Removed plugin weight-only (ftq-weight-only 0.1.0)." in result.output


def test_fresh_process_lists_the_entry_points_it_sees(tmp_path, monkeypatch):
    from plugin_fakes import QUANTIZER_PLUGIN, write_distribution

    write_distribution(tmp_path, "ftq-fresh", "3.1", {"fresh": "fresh_mod"}, {"fresh_mod": QUANTIZER_PLUGIN.format(name="f")})
    assert ("fresh", "ftq-fresh", "3.1") not in installer._entry_points_in_fresh_process()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert ("fresh", "ftq-fresh", "3.1") in installer._entry_points_in_fresh_process()


def test_plugins_options_lists_each_option_with_type_default_and_help():
    runner = CliRunner()
    one = runner.invoke(cli_module.cli, ["plugins", "--options", "static"])
    assert one.exit_code == 0, one.output
    assert one.output.startswith("quantizer static (plugin static_quantizer)")
    assert "    ppl_budget: float or none (default 2.0)\n" in one.output
    assert "    backend: one of 'ftq', 'torch-ao' (default ftq)\n" in one.output
    entries = json.loads(runner.invoke(cli_module.cli, ["plugins", "--options", "--json"]).output)
    by_name = {(e["kind"], e["name"]): e for e in entries}
    assert {("dataset", "text"), ("trainer", "causal-lm"), ("quantizer", "dynamic")} <= set(by_name)
    keep_float = next(o for o in by_name[("quantizer", "dynamic")]["options"] if o["name"] == "keep_float")
    assert keep_float == {"name": "keep_float", "type": "a list of str", "default": "(empty)",
                          "help": "glob patterns of layer names kept in float, e.g. lm_head,*.down_proj"}


def test_plugins_options_for_an_unknown_name_lists_the_known_ones_and_name_needs_the_flag():
    runner = CliRunner()
    unknown = runner.invoke(cli_module.cli, ["plugins", "--options", "dynamik"])
    assert unknown.exit_code == 2 and "no dataset, trainer or quantizer is called 'dynamik'; known: " in unknown.output
    assert "dynamic" in unknown.output and "Traceback" not in unknown.output
    bare = runner.invoke(cli_module.cli, ["plugins", "dynamic"])
    assert bare.exit_code == 2 and "NAME ('dynamic') goes with --options" in bare.output

"""A broken plugin is reported and skipped; every other plugin keeps working.

Fake plugins are registered on fresh managers (``Plugins(builtins=(),
load_entrypoints=False)``), or installed as real entry points on a temporary
``sys.path`` entry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import click
import pytest
from plugin_fakes import QUANTIZER_PLUGIN, plugin_module, write_distribution

from ftq_core.errors import UnknownComponentError
from ftq_core.hookspecs import API_VERSION
from ftq_core.plugins import Plugins


def fresh() -> Plugins:
    return Plugins(builtins=(), load_entrypoints=False)


def good(name: str = "good-q"):
    return plugin_module(f"good_{name.replace('-', '_')}", QUANTIZER_PLUGIN.format(name=name))


def assert_still_works(manager: Plugins, quantizer: str = "good-q") -> None:
    component = manager.get("quantizer", quantizer)
    assert component.create({}).prepare("model") == "model"


# -- failing to import ---------------------------------------------------------


def test_entry_point_that_fails_to_import_is_reported_and_skipped(tmp_path, monkeypatch):
    write_distribution(
        tmp_path, "fake-plugins", "1.2", {"ok": "fake_ok_mod", "broken": "fake_broken_mod"},
        {"fake_ok_mod": QUANTIZER_PLUGIN.format(name="good-q"),
         "fake_broken_mod": "raise ImportError('needs libfoo, which is not installed')\n"},
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = Plugins(builtins=("text_dataset",), allow=["ok", "broken"])
    broken = manager.infos["broken"]
    assert broken.status == "failed" and broken.source == "entry point"
    assert broken.distribution == "fake-plugins" and broken.version == "1.2"
    (error,) = broken.errors
    assert "failed to import fake_broken_mod" in error and "needs libfoo" in error
    assert "--disable-plugin broken" in error
    ok = manager.infos["ok"]
    assert ok.status == "loaded" and ok.location.endswith("fake_ok_mod.py")
    assert_still_works(manager)
    assert manager.get("dataset", "text").plugin == "text_dataset"


def test_builtin_that_fails_to_import_is_reported_and_the_rest_load():
    manager = Plugins(builtins=("text_dataset", "ftq_plugins.no_such_module"), load_entrypoints=False)
    assert manager.infos["no_such_module"].status == "failed"
    assert "ModuleNotFoundError" in manager.infos["no_such_module"].errors[0]
    assert manager.get("dataset", "text")


# -- duplicate names -------------------------------------------------------------


def test_duplicate_component_name_keeps_the_first_and_reports_the_second():
    manager = fresh()
    manager.register(good("same"), name="first")
    manager.register(plugin_module("second_dup", QUANTIZER_PLUGIN.format(name="same")), name="second")
    manager.register(good(), name="other")
    assert manager.get("quantizer", "same").plugin == "first"
    (error,) = manager.infos["second"].errors
    assert "plugin 'second' registered quantizer 'same', which plugin 'first' already registered" in error
    assert "second registration was skipped" in error
    assert manager.infos["first"].errors == []
    assert_still_works(manager)


def test_duplicate_entry_point_name_is_reported(tmp_path, monkeypatch):
    write_distribution(tmp_path / "a", "pkg-a", "1.0", {"twin": "twin_a_mod"}, {"twin_a_mod": QUANTIZER_PLUGIN.format(name="from-a")})
    write_distribution(tmp_path / "b", "pkg-b", "1.0", {"twin": "twin_b_mod"}, {"twin_b_mod": QUANTIZER_PLUGIN.format(name="from-b")})
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    manager = Plugins(builtins=(), allow=["twin"])
    skipped = [info for info in manager.describe() if info.errors]
    assert len(skipped) == 1
    assert "a plugin named 'twin'" in skipped[0].errors[0] and "already loaded" in skipped[0].errors[0]
    assert len(manager.table("quantizer").names()) == 1  # only the first one's quantizer


#: A plugin registering one do-nothing module codec of kind ``{kind}``.
CODEC_PLUGIN = '''
from ftq_core import hookimpl

class Codec:
    kind = "{kind}"
    module_type = object
    def export(self, module): return {{}}, {{}}
    def restore(self, tensors, meta): return None

@hookimpl
def register_module_codecs(register):
    register(Codec())
'''


def test_duplicate_codec_kind_is_reported():
    source = CODEC_PLUGIN.format(kind="same.kind")
    manager = fresh()
    manager.register(plugin_module("codec_a", source), name="codec-a")
    manager.register(plugin_module("codec_b", source), name="codec-b")
    assert list(manager.codecs()) == ["same.kind"]
    assert manager.infos["codec-a"].codecs == ["same.kind"]
    assert "already registered by plugin 'codec-a'" in manager.infos["codec-b"].errors[0]


# -- wrong hook signatures -------------------------------------------------------


def test_hook_with_a_wrong_signature_is_rejected_and_the_rest_work():
    manager = fresh()
    bad = plugin_module("bad_signature", '''
from ftq_core import hookimpl

@hookimpl
def register_quantizers(register, device):
    register("never", object, object)
''')
    info = manager.register(bad, name="bad")
    manager.register(good(), name="good")
    assert info.status == "failed"
    assert "wrong hook signature" in info.errors[0] and "device" in info.errors[0]
    assert not manager.pm.is_registered(bad)
    with pytest.raises(UnknownComponentError):
        manager.get("quantizer", "never")
    assert_still_works(manager)


def test_misspelled_hook_is_rejected_with_a_suggestion():
    manager = fresh()
    typo = plugin_module("typo_hook", '''
from ftq_core import hookimpl

@hookimpl
def register_quantiser(register):
    pass
''')
    info = manager.register(typo, name="typo")
    manager.register(good(), name="good")
    assert info.status == "failed"
    assert "unknown hook 'register_quantiser' (did you mean 'register_quantizers'?)" in info.errors[0]
    assert_still_works(manager)


def test_register_called_wrongly_inside_a_hook_is_reported():
    manager = fresh()
    info = manager.register(plugin_module("wrong_call", '''
from ftq_core import hookimpl

@hookimpl
def register_quantizers(register):
    register("no-config-class", object)
'''), name="wrong-call")
    manager.register(good(), name="good")
    assert_still_works(manager)
    assert "register_quantizers failed: TypeError" in info.errors[0]


# -- API versions ----------------------------------------------------------------


def test_plugin_needing_a_newer_api_is_refused_with_a_message():
    manager = fresh()
    future = good("future-q")
    future.FTQ_API_VERSION = API_VERSION + 1
    info = manager.register(future, name="future")
    manager.register(good(), name="good")
    assert info.status == "failed" and info.api_version == API_VERSION + 1
    assert f"written for ftq plugin API {API_VERSION + 1}, and this ftq provides API {API_VERSION}" in info.errors[0]
    assert "upgrade ftq" in info.errors[0]
    with pytest.raises(UnknownComponentError):
        manager.get("quantizer", "future-q")
    assert_still_works(manager)


@pytest.mark.parametrize("declared", ["1", 1.0, True])
def test_api_version_must_be_an_integer(declared):
    odd = good("odd-q")
    odd.FTQ_API_VERSION = declared
    info = fresh().register(odd, name="odd")
    assert info.status == "failed" and "it must be an integer" in info.errors[0]


def test_current_and_older_api_versions_load():
    manager = fresh()
    for version in (API_VERSION, 0):
        plugin = good(f"v{version}-q")
        plugin.FTQ_API_VERSION = version
        assert manager.register(plugin, name=f"v{version}").status == "loaded"


# -- environment switches ---------------------------------------------------------


def test_load_and_disable_by_distribution_name(tmp_path, monkeypatch):
    write_distribution(tmp_path, "ftq-fake", "0.3", {"fake": "fake_env_mod"}, {"fake_env_mod": QUANTIZER_PLUGIN.format(name="env-q")})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FTQ_LOAD_PLUGINS", "ftq-fake,not-installed")
    manager = Plugins(builtins=())
    assert manager.get("quantizer", "env-q").plugin == "fake"
    assert "FTQ_LOAD_PLUGINS names 'not-installed'" in manager.infos["not-installed"].errors[0]
    monkeypatch.setenv("FTQ_DISABLE_PLUGINS", "ftq-fake")
    manager = Plugins(builtins=())
    assert manager.infos["fake"].status == "disabled"
    with pytest.raises(UnknownComponentError):
        manager.get("quantizer", "env-q")
    monkeypatch.setenv("FTQ_LOAD_PLUGINS", "")
    monkeypatch.delenv("FTQ_DISABLE_PLUGINS")
    assert "fake" not in Plugins(builtins=()).infos


def test_disabling_a_builtin_and_unmatched_names():
    manager = Plugins(disabled=["dynamic_quantizer", "no-such-plugin"], load_entrypoints=False)
    assert manager.infos["dynamic_quantizer"].status == "disabled"
    assert manager.unmatched_disabled() == ["no-such-plugin"]
    with pytest.raises(UnknownComponentError):
        manager.get("quantizer", "dynamic")
    assert manager.get("dataset", "text")


# -- commands ----------------------------------------------------------------------


COMMANDS_PLUGIN = '''
import click
from ftq_core import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command()
    def hello():
        """Say hello."""
        click.echo("hello from a plugin")
'''


def test_plugin_commands_are_added_and_listed():
    manager = fresh()
    manager.register(plugin_module("cmd_ok", COMMANDS_PLUGIN), name="cmds")
    group = click.Group("ftq")
    manager.add_commands(group)
    assert "hello" in group.commands
    assert manager.infos["cmds"].commands == ["hello"]
    assert fresh_describe_commands(manager) == ["hello"]


def fresh_describe_commands(manager: Plugins) -> list[str]:
    (info,) = [i for i in manager.describe() if i.name == "cmds"]
    return info.commands


def test_plugin_cannot_replace_an_existing_command_and_a_failing_hook_adds_nothing():
    manager = fresh()
    manager.register(plugin_module("cmd_clash", '''
import click
from ftq_core import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command(name="run")
    def hijack():
        pass
'''), name="clash")
    manager.register(plugin_module("cmd_fail", '''
import click
from ftq_core import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command()
    def half():
        pass
    raise RuntimeError("broken after adding one command")
'''), name="fails")
    manager.register(plugin_module("cmd_ok2", COMMANDS_PLUGIN), name="cmds")
    group = click.Group("ftq")

    @group.command(name="run")
    def original_run():
        pass

    manager.add_commands(group)
    assert group.commands["run"] is original_run
    assert "command 'run' already exists" in manager.infos["clash"].errors[0]
    assert "half" not in group.commands
    assert "register_commands failed: RuntimeError" in manager.infos["fails"].errors[0]
    assert "hello" in group.commands


# -- plugin code that exits, interrupts or hangs ---------------------------------

ESCAPING_PLUGINS = {
    "sys-exit": "import sys\nsys.exit(1)\n",
    "system-exit-in-hook": QUANTIZER_PLUGIN.format(name="never").replace(
        'register("never"', 'raise SystemExit(3)\n    register("never"'),
    "own-keyboard-interrupt": "raise KeyboardInterrupt('not a real Ctrl-C')\n",
    "base-exception": "class Odd(BaseException):\n    pass\nraise Odd('odd')\n",
}


@pytest.mark.parametrize("case", sorted(ESCAPING_PLUGINS))
def test_plugin_raising_a_base_exception_is_reported_and_skipped(tmp_path, monkeypatch, case):
    module = f"escaping_{case.replace('-', '_')}"
    write_distribution(tmp_path, "escaping-plugin", "0.3", {"esc": module, "ok": "esc_ok_mod"},
                       {module: ESCAPING_PLUGINS[case], "esc_ok_mod": QUANTIZER_PLUGIN.format(name="good-q")})
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = Plugins(builtins=(), allow=["esc", "ok"])
    manager.table("quantizer")
    (error,) = manager.infos["esc"].errors
    expected = {"sys-exit": "SystemExit: it called sys.exit(1)", "system-exit-in-hook": "SystemExit: it called sys.exit(3)",
                "own-keyboard-interrupt": "KeyboardInterrupt: not a real Ctrl-C", "base-exception": "Odd: odd"}[case]
    assert expected in error
    assert_still_works(manager)


def test_plugin_that_calls_sys_exit_at_import_does_not_silence_the_cli(tmp_path):
    write_distribution(tmp_path, "exiting-plugin", "1.0", {"exiter": "exiter_mod"}, {"exiter_mod": "import sys\nsys.exit(1)\n"})
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("FTQ_LOAD_PLUGINS", None)
    result = subprocess.run([sys.executable, "-m", "ftq_core.cli", "plugins"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "exiter" in result.stdout and "it called sys.exit(1)" in result.stdout
    assert "--disable-plugin exiter" in result.stdout


def test_hanging_hook_is_skipped_after_the_time_budget(monkeypatch):
    monkeypatch.setenv("FTQ_PLUGIN_TIMEOUT", "0.5")
    manager = fresh()
    manager.register(plugin_module("hangs_mod", QUANTIZER_PLUGIN.format(name="slow").replace(
        'register("slow"', '__import__("time").sleep(30)\n    register("slow"')), name="hangs")
    manager.register(good(), name="good")
    started = time.monotonic()
    assert_still_works(manager)
    assert time.monotonic() - started < 10
    (error,) = manager.infos["hangs"].errors
    assert "register_quantizers failed: did not finish within 0.5 s" in error and "FTQ_PLUGIN_TIMEOUT" in error
    with pytest.raises(UnknownComponentError):
        manager.get("quantizer", "slow")


def test_hanging_import_is_skipped_after_the_time_budget(tmp_path, monkeypatch):
    monkeypatch.setenv("FTQ_PLUGIN_TIMEOUT", "0.2")  # imports get three times the hook budget
    write_distribution(tmp_path, "hanging-plugin", "1.0", {"hang": "hang_mod", "ok": "hang_ok_mod"},
                       {"hang_mod": "import time\ntime.sleep(30)\n", "hang_ok_mod": QUANTIZER_PLUGIN.format(name="good-q")})
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = Plugins(builtins=(), allow=["hang", "ok"])
    assert "did not finish within 0.6 s" in manager.infos["hang"].errors[0]
    assert_still_works(manager)


def test_bad_plugin_timeout_setting_is_a_usage_error(monkeypatch):
    from ftq_core.errors import UsageError

    monkeypatch.setenv("FTQ_PLUGIN_TIMEOUT", "ten")
    with pytest.raises(UsageError, match="FTQ_PLUGIN_TIMEOUT='ten' is not a number"):
        fresh()


# -- built-in names stay ftq's ----------------------------------------------------


def test_built_in_names_are_what_the_built_ins_register():
    from ftq_core.plugins import BUILTIN_NAMES
    from ftq_core.registry import COMPONENT_KINDS

    manager = Plugins(load_entrypoints=False)
    registered = {kind: frozenset(manager.table(kind).names()) for kind in COMPONENT_KINDS}
    registered["codec"] = frozenset(manager.codecs())
    assert registered == BUILTIN_NAMES


def test_third_party_cannot_take_a_disabled_built_in_name(tmp_path, monkeypatch):
    write_distribution(tmp_path, "impostor", "6.6", {"impostor": "impostor_mod"},
                       {"impostor_mod": QUANTIZER_PLUGIN.format(name="dynamic")})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FTQ_DISABLE_PLUGINS", "dynamic_quantizer")
    manager = Plugins(allow=["impostor"])
    with pytest.raises(UnknownComponentError):
        manager.get("quantizer", "dynamic")
    (error,) = manager.infos["impostor"].errors
    assert "quantizer name 'dynamic' is reserved for ftq's built-in plugins" in error


def test_third_party_cannot_take_a_built_in_codec_kind():
    manager = fresh()
    manager.register(plugin_module("codec_impostor", CODEC_PLUGIN.format(kind="ftq.int8_linear")), name="codec-impostor")
    assert manager.codecs() == {}
    assert "module codec name 'ftq.int8_linear' is reserved" in manager.infos["codec-impostor"].errors[0]


def test_third_party_quantizer_is_named_with_its_package_in_report_and_manifest(tmp_path, monkeypatch, tiny_loaded):
    import json

    import ftq_core

    write_distribution(tmp_path / "site", "ftq-identity", "2.5", {"identity": "identity_q_mod"},
                       {"identity_q_mod": QUANTIZER_PLUGIN.format(name="identity")})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    manager = Plugins(allow=["identity"])
    result = ftq_core.run(
        {"output_dir": str(tmp_path / "out"), "quantizer": "identity", "trainer": "none", "evaluate_pretrained": False,
         "dataset": {"block_size": 32}, "eval": {"max_blocks": 1, "latency": False}},
        model=tiny_loaded, plugins=manager,
    )
    assert result.quantized.label == "identity (ftq-identity 2.5)"  # no layer it quantized names a precision
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    assert manifest["components"]["quantizer"] == {
        "name": "identity", "plugin": "identity", "distribution": "ftq-identity", "version": "2.5", "source": "entry point"}
    report = json.loads(result.report_paths["json"].read_text())
    assert report["quantizer"]["plugin"]["distribution"] == "ftq-identity"


# -- a plugin that crashes mid-run: one line naming it ----------------------------


def test_plugin_crash_in_convert_is_one_line_naming_the_plugin(tmp_path, tiny_model_dir):
    crashing = QUANTIZER_PLUGIN.format(name="crashy").replace(
        "    def convert(self, model):\n        return model", "    def convert(self, model):\n        return {}['missing']")
    write_distribution(tmp_path / "site", "ftq-crashy", "0.9", {"crashy": "crashy_mod"}, {"crashy_mod": crashing})
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               FTQ_LOAD_PLUGINS="crashy")
    env.pop("FTQ_DEBUG", None)
    args = [sys.executable, "-m", "ftq_core.cli", "quantize", str(tiny_model_dir), "-q", "crashy", "-o", str(tmp_path / "o")]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "plugin 'crashy' (ftq-crashy 0.9) failed in quantizer 'crashy' convert: KeyError: 'missing'" in result.stderr
    assert "--disable-plugin crashy" in result.stderr and "Traceback" not in result.stderr
    debug = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" in debug.stderr and "KeyError" in debug.stderr


def test_a_bug_in_a_built_in_keeps_its_traceback():
    manager = Plugins(builtins=("dynamic_quantizer",), load_entrypoints=False)
    with pytest.raises(ZeroDivisionError):
        with manager.guard("dynamic_quantizer", "convert"):
            1 / 0


# -- plugins that load but do nothing -------------------------------------------


def test_undecorated_register_function_is_warned_about():
    manager = fresh()
    info = manager.register(plugin_module("undecorated_mod", '''
def register_quantizers(register):
    register("never", object, object)
'''), name="undecorated")
    assert info.status == "loaded with warnings"
    assert any("defines register_quantizers() without @hookimpl" in w for w in info.warnings)
    assert any("implements no ftq hook" in w for w in info.warnings)


def test_plugin_command_named_like_a_built_in_is_reported_by_ftq_plugins(tmp_path):
    write_distribution(tmp_path, "hijacker", "1.0", {"hijack": "hijack_mod"}, {"hijack_mod": '''
from ftq_core import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command(name="run")
    def run():
        print("hijacked")
'''})
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", FTQ_LOAD_PLUGINS="hijack")
    result = subprocess.run([sys.executable, "-m", "ftq_core.cli", "plugins", "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    (info,) = [p for p in json.loads(result.stdout) if p["name"] == "hijack"]
    assert info["commands"] == [] and "command 'run' already exists" in info["errors"][0]


def test_a_plugin_that_prints_at_import_leaves_ftq_plugins_json_valid(tmp_path):
    """What plugin code prints while ftq loads it goes to stderr, so stdout stays JSON (ftq install reads it)."""
    write_distribution(tmp_path, "chatty", "1.0", {"chatty": "chatty_mod"}, {"chatty_mod": '''
print("hello from chatty at import")
from ftq_core import hookimpl

@hookimpl
def register_quantizers(register):
    print("hello from chatty's hook")
'''})
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", FTQ_LOAD_PLUGINS="chatty")
    result = subprocess.run([sys.executable, "-m", "ftq_core.cli", "plugins", "--json", "--all"], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    (info,) = [p for p in json.loads(result.stdout) if p["name"] == "chatty"]
    assert info["status"] == "loaded"
    assert "hello from chatty at import" in result.stderr and "hello from chatty's hook" in result.stderr


def test_unknown_name_among_thousands_lists_the_closest_in_one_short_line():
    known = [f"method-{i}" for i in range(10_000)]
    message = str(UnknownComponentError("quantizer", "method-42x", known))
    assert "Closest known quantizers: method-42," in message and "and 9995 more" in message
    assert len(message) < 400 and "\n" not in message
    far = str(UnknownComponentError("quantizer", "zzz" * 100, known))
    assert "Known quantizers: method-0, method-1," in far and "and 9980 more" in far
    assert "zzz" * 30 not in far  # a pasted name is clipped too
    assert "Known quantizers: a, b." in str(UnknownComponentError("quantizer", "c", ["b", "a"]))

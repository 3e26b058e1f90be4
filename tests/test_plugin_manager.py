"""The plugin manager: hook specs, registration, isolation of broken plugins, FTQ_LOAD_PLUGINS."""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest

from ftq_core.errors import ConfigError, UnknownComponentError
from ftq_core.hookspecs import hookimpl
from ftq_core.plugins import Plugins
from ftq_core.protocols import QuantPhase


@dataclass(frozen=True, kw_only=True)
class EchoConfig:
    factor: int = 2

    def __post_init__(self):
        from ftq_core.configs import check

        check([(self.factor > 0, f"factor must be > 0, got {self.factor}")])


class EchoQuantizer:
    phase = QuantPhase.POST_TRAINING
    needs_calibration = False
    engine = None

    def __init__(self, config):
        self.config = config

    def prepare(self, model):
        return model

    def convert(self, model):
        return model

    def layer_report(self, model):
        return []


class FakePlugin:
    @hookimpl
    def register_quantizers(self, register):
        register("echo", EchoQuantizer, EchoConfig, description="test quantizer")


def fresh() -> Plugins:
    return Plugins(builtins=(), load_entrypoints=False)


def test_fake_plugin_registers_a_quantizer_with_its_config():
    plugins = fresh()
    plugins.register(FakePlugin(), name="fake")
    component = plugins.get("quantizer", "echo")
    assert component.plugin == "fake"
    from ftq_core.configs import CommandLineText

    quantizer = component.create({"factor": CommandLineText("3")})  # text from --set is coerced
    assert isinstance(quantizer, EchoQuantizer) and quantizer.config.factor == 3
    assert plugins.infos["fake"].components == {"quantizer": ["echo"]}
    plugins.unregister("fake")
    with pytest.raises(UnknownComponentError):
        plugins.get("quantizer", "echo")


def test_unknown_component_lists_known_ones():
    plugins = Plugins(load_entrypoints=False)
    with pytest.raises(UnknownComponentError) as info:
        plugins.get("quantizer", "dynamik")
    assert "dynamic" in str(info.value) and "ftq plugins" in str(info.value)


def test_component_config_reports_every_problem_at_once():
    plugins = Plugins(load_entrypoints=False)
    with pytest.raises(ConfigError) as info:
        plugins.get("trainer", "causal-lm").make_config({"max_step": 3, "lr": -1, "batch_size": "many"})
    text = str(info.value)
    assert "did you mean 'max_steps'" in text
    assert "batch_size: must be an integer" in text
    assert "lr must be > 0" in text
    assert len(info.value.problems) == 3


def test_duplicate_name_is_reported_against_the_second_plugin():
    plugins = fresh()
    plugins.register(FakePlugin(), name="first")
    plugins.register(FakePlugin(), name="second")
    assert plugins.get("quantizer", "echo").plugin == "first"
    assert any("already registered" in e for e in plugins.infos["second"].errors)


def test_plugin_raising_in_its_hook_is_skipped_and_others_keep_working():
    class Broken:
        @hookimpl
        def register_quantizers(self, register):
            raise RuntimeError("boom")

    plugins = fresh()
    plugins.register(Broken(), name="broken")
    plugins.register(FakePlugin(), name="fake")
    assert plugins.table("quantizer").names() == ["echo"]
    assert "boom" in plugins.errors()["broken"][0]


def test_hook_with_wrong_signature_is_refused():
    class WrongArgs:
        @hookimpl
        def register_quantizers(self, register, unexpected):
            pass

    plugins = fresh()
    info = plugins.register(WrongArgs(), name="wrong")
    assert not info.loaded
    assert "wrong hook signature" in info.errors[0]


def test_hook_with_no_matching_spec_is_refused():
    class Typo:
        @hookimpl
        def register_quantiser(self, register):
            pass

    plugins = fresh()
    info = plugins.register(Typo(), name="typo")
    assert not info.loaded and "register_quantiser" in info.errors[0]


def test_plugin_needing_a_newer_api_is_refused():
    module = types.ModuleType("future_plugin")
    module.FTQ_API_VERSION = 99
    plugins = fresh()
    info = plugins.register(module, name="future")
    assert not info.loaded and "plugin API 99" in info.errors[0]


class _EntryPoint:
    """Stands in for importlib.metadata.EntryPoint."""

    def __init__(self, name, loader):
        self.name, self.value, self._loader = name, f"{name}_module", loader
        self.dist = types.SimpleNamespace(name=f"ftq-{name}", version="1.0")

    def load(self):
        return self._loader()


def _fake_entry_points(monkeypatch, entries):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: entries if group == "ftq" else [])


def test_entry_point_that_fails_to_import_is_reported_and_skipped(monkeypatch):
    def explode():
        raise ImportError("No module named 'missing_dependency'")

    _fake_entry_points(monkeypatch, [_EntryPoint("bad", explode), _EntryPoint("good", FakePlugin)])
    monkeypatch.delenv("FTQ_LOAD_PLUGINS")
    plugins = Plugins(builtins=("dynamic_quantizer",))
    assert "missing_dependency" in plugins.errors()["bad"][0]
    assert set(plugins.table("quantizer").names()) == {"dynamic", "echo"}


@pytest.mark.parametrize(
    ("setting", "expected"),
    [(None, {"dynamic", "echo", "other"}), ("", {"dynamic"}), ("good", {"dynamic", "echo"}), ("ftq-other", {"dynamic", "other"})],
)
def test_ftq_load_plugins_controls_third_party_loading(monkeypatch, setting, expected):
    class Other:
        @hookimpl
        def register_quantizers(self, register):
            register("other", EchoQuantizer, EchoConfig)

    loaded = []

    def loader(cls):
        def load():
            loaded.append(cls.__name__)
            return cls()

        return load

    _fake_entry_points(monkeypatch, [_EntryPoint("good", loader(FakePlugin)), _EntryPoint("other", loader(Other))])
    if setting is None:
        monkeypatch.delenv("FTQ_LOAD_PLUGINS")
    else:
        monkeypatch.setenv("FTQ_LOAD_PLUGINS", setting)
    plugins = Plugins(builtins=("dynamic_quantizer",))
    assert set(plugins.table("quantizer").names()) == expected
    # a plugin left out is never imported: its code does not run
    assert len(loaded) == len(expected) - 1


def test_disabled_plugin_is_not_loaded(monkeypatch):
    _fake_entry_points(monkeypatch, [_EntryPoint("good", FakePlugin)])
    monkeypatch.delenv("FTQ_LOAD_PLUGINS")
    monkeypatch.setenv("FTQ_DISABLE_PLUGINS", "good,dynamic_quantizer")
    plugins = Plugins(builtins=("dynamic_quantizer",))
    assert plugins.table("quantizer").names() == []
    assert plugins.infos["good"].disabled and not plugins.infos["good"].loaded


def test_builtins_are_ordinary_plugins():
    plugins = Plugins(load_entrypoints=False)
    assert plugins.table("dataset").names() == ["chat", "text"]
    assert "causal-lm" in plugins.table("trainer")
    assert "dynamic" in plugins.table("quantizer") and plugins.table("exporter").names() == ["gguf", "hf"]
    assert all(info.source == "built-in" and not info.errors for info in plugins.describe())


def test_every_hook_spec_is_documented():
    import inspect

    from ftq_core import hookspecs

    specs = [f for name, f in vars(hookspecs).items() if name.startswith("register_") and callable(f)]
    assert len(specs) >= 4
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert "Called" in doc and ":param" in doc and ":return:" in doc, spec.__name__


def test_optional_protocol_members_have_declared_defaults_and_isinstance_asks_only_for_required_ones():
    from ftq_core.protocols import DatasetBuilder, Quantizer, Trainer, optional_member

    class OnlyBuild:
        def build(self, tokenizer):
            return None

    class OnlyTrain:
        def train(self, model, data, *, checkpoint_dir, resume, on_step=None):
            return None

    assert isinstance(OnlyBuild(), DatasetBuilder) and isinstance(OnlyTrain(), Trainer)
    assert optional_member(OnlyBuild(), DatasetBuilder, "check") is None
    assert optional_member(OnlyTrain(), Trainer, "distills") is False
    assert optional_member(OnlyTrain(), Trainer, "checkpoints_kept") == 0
    assert optional_member(object(), Quantizer, "on_train_step") is None
    with pytest.raises(KeyError):
        optional_member(OnlyTrain(), Trainer, "distill")  # not declared: the core may not read it

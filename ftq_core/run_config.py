"""The configuration of one ``ftq run``, from Python, a TOML file or CLI flags.

TOML layout (every key optional)::

    model = "smollm2"            # bundled name, .gguf file or HF directory
    output_dir = "ftq-out"
    resume = false
    calibration_batches = 8

    [dataset]                    # name + the dataset's own options
    name = "text"
    path = "my.txt"

    [trainer]                    # name = "none" skips fine-tuning
    name = "causal-lm"
    max_steps = 30

    [quantizer]
    name = "dynamic"

    [adapter]                    # name = "none" (default): no adapter
    name = "lora"
    rank = 16

    [eval]
    max_blocks = 8

Component options are checked against the config class the plugin registered;
every problem in every section is reported in one :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from .configs import build_config, check
from .errors import ConfigError, UnknownComponentError, UsageError
from .evaluation import EvalSettings
from .memory_plan import Layerwise
from .registry import Component

__all__ = [
    "ComponentChoice",
    "RunConfig",
    "ResolvedComponent",
    "ResolvedRun",
    "run_config_from_mapping",
    "load_toml",
    "resolve",
    "check_flags_against_file",
    "check_flags_against_sets",
]

NO_TRAINER = "none"
NO_ADAPTER = "none"


@dataclass(frozen=True, kw_only=True)
class ComponentChoice:
    """A component by name, with its options (validated against the plugin's config class)."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one run needs; defaults run the demo on the bundled model and sample."""

    model: str = "smollm2"
    output_dir: str = "ftq-out"
    dataset: ComponentChoice = field(default_factory=lambda: ComponentChoice(name="text"))
    trainer: ComponentChoice = field(default_factory=lambda: ComponentChoice(name="causal-lm"))
    quantizer: ComponentChoice = field(default_factory=lambda: ComponentChoice(name="dynamic"))
    #: Trained over the converted model instead of fine-tuning the float one ("none": no adapter).
    adapter: ComponentChoice = field(default_factory=lambda: ComponentChoice(name=NO_ADAPTER))
    eval: EvalSettings = field(default_factory=EvalSettings)
    calibration_batches: int = 8
    evaluate_pretrained: bool = True
    resume: bool = False
    #: Keep ``<output_dir>/checkpoints`` after a run that completed (to resume it later with more steps);
    #: by default they are deleted once the artifact and report are written.
    keep_checkpoints: bool = False
    #: An adapter run over a float Hugging Face directory that fits in memory only one decoder layer at a time
    #: quantizes it that way first (``auto``), always (``on``) or never (``off``); see :mod:`ftq_core.layerwise`.
    layerwise: Layerwise = Layerwise.AUTO

    def __post_init__(self) -> None:
        check(
            [
                (bool(self.model), "model must name a bundled model, a .gguf file or a model directory"),
                (bool(self.output_dir), "output_dir must not be empty"),
                (self.calibration_batches >= 1, f"calibration_batches must be >= 1, got {self.calibration_batches}"),
            ]
        )

    @property
    def trains(self) -> bool:
        return self.trainer.name != NO_TRAINER

    @property
    def adapts(self) -> bool:
        return self.adapter.name != NO_ADAPTER


_SECTIONS = ("dataset", "trainer", "quantizer", "adapter")


def run_config_from_mapping(values: Mapping[str, Any], *, where: str = "run configuration", plugins=None) -> RunConfig:
    """Build a :class:`RunConfig` from a TOML-shaped mapping, reporting all problems at once.

    With ``plugins``, component names and their options are checked too, so a
    file with a bad key and an unknown quantizer reports both in one error.
    """
    known = {f.name for f in fields(RunConfig)}
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string; keys are option names")
        elif key in _SECTIONS:
            if isinstance(value, str):
                kwargs[key] = ComponentChoice(name=value)
            elif isinstance(value, Mapping):
                options = dict(value)
                name = options.pop("name", getattr(RunConfig(), key).name)
                if not isinstance(name, str) or not name:
                    problems.append(f"[{key}] name must be a component name (a string), got {name!r}")
                    continue
                kwargs[key] = ComponentChoice(name=name, options=options)
            else:
                problems.append(f"[{key}] must be a table with a 'name' key, or a component name")
        elif key == "eval":
            if not isinstance(value, Mapping):
                problems.append("[eval] must be a table")
                continue
            try:
                kwargs["eval"] = build_config(EvalSettings, value, where="[eval]")
            except ConfigError as exc:
                problems.extend(f"[eval] {p}" for p in exc.problems)
        elif key in known:
            kwargs[key] = value
        else:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"unknown key {key!r}{hint}; known keys: {', '.join(sorted(known))}")
    plain = {k: v for k, v in kwargs.items() if k not in (*_SECTIONS, "eval")}
    try:
        # coerced values ("4" from --set becomes 4) replace the raw ones
        checked = build_config(_PlainRunFields, plain, where=where)
        kwargs.update({k: getattr(checked, k) for k in plain})
    except ConfigError as exc:
        problems.extend(exc.problems)
    if problems or plugins is not None:
        # Report the component options' problems in the same pass, not after a fix-and-retry.
        sections = {k: v for k, v in kwargs.items() if k in _SECTIONS}
        if plugins is None:
            from .plugins import get_plugins

            plugins = get_plugins()
        problems.extend(_resolve_components({kind: getattr(RunConfig(**sections), kind) for kind in _SECTIONS}, plugins)[1])
    if problems:
        raise ConfigError(problems, where=where)
    return RunConfig(**kwargs)


@dataclass(frozen=True, kw_only=True)
class _PlainRunFields:
    """The scalar fields of RunConfig, for type checking mapping input."""

    model: str = "smollm2"
    output_dir: str = "ftq-out"
    calibration_batches: int = 8
    evaluate_pretrained: bool = True
    resume: bool = False
    keep_checkpoints: bool = False
    layerwise: Layerwise = Layerwise.AUTO

    def __post_init__(self) -> None:
        check([(self.calibration_batches >= 1, f"calibration_batches must be >= 1, got {self.calibration_batches}")])


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist; check the path given to -c/--config")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"], where=f"config file {path}") from None


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            items.extend(_leaves(value, f"{prefix}{key}."))
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _file_value(values: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    """``(present, value)`` of ``section.key`` in a TOML mapping (a bare string section is its name)."""
    node: Any = values
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, str) and parts[i:] == ["name"]:
            return True, node
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_flags_against_file(file_values: Mapping[str, Any], flags: Mapping[str, Any], *, file_name: str, flag_names: Mapping[str, str]) -> None:
    """Refuse command-line flags that set a value the config file sets differently.

    A flag and a file that disagree is most often a stale file or a typo, and
    silently preferring either would run something the user did not mean.
    ``--set section.key=value`` is the explicit way to override the file and
    is not checked here.  All contradictions are reported in one error.
    """
    problems = []
    for dotted, value in _leaves(flags):
        present, in_file = _file_value(file_values, dotted)
        if present and in_file != value:
            flag = flag_names.get(dotted, dotted)
            shown = "" if isinstance(value, bool) else f" {value!r}"
            problems.append(
                f"{flag}{shown} contradicts {file_name}, which sets {dotted} = {in_file!r}; drop the flag, edit "
                f"the file, or override the file on purpose with --set {dotted}={value}"
            )
    if problems:
        raise ConfigError(problems, where="the command line")


def check_flags_against_sets(flags: Mapping[str, Any], sets: Mapping[str, Any], *, flag_names: Mapping[str, str]) -> None:
    """Refuse a flag and a ``--set`` that give one option two values on the same command line.

    Either could be the one meant, so neither silently wins.
    """
    given = dict(_leaves(sets))
    for section, value in sets.items():  # ``--set quantizer=static`` names the component too
        if isinstance(value, str):
            given[f"{section}.name"] = value
    problems = []
    for dotted, value in _leaves(flags):
        if dotted in given and str(given[dotted]).strip().lower() != str(value).strip().lower():
            flag = flag_names.get(dotted, dotted)
            shown = "" if isinstance(value, bool) else f" {value}"
            problems.append(
                f"{flag}{shown} and --set {dotted}={given[dotted]} give {dotted} two values; keep one of them"
            )
    if problems:
        raise ConfigError(problems, where="the command line")


class ResolvedComponent(NamedTuple):
    """A registered component and its validated options."""

    component: Component
    config: Any


@dataclass(frozen=True)
class ResolvedRun:
    """A RunConfig with each component found and its options validated."""

    config: RunConfig
    dataset: ResolvedComponent
    trainer: ResolvedComponent | None  # None: trainer "none"
    quantizer: ResolvedComponent
    adapter: ResolvedComponent | None = None  # None: adapter "none"


def _resolve_components(choices: Mapping[str, ComponentChoice], plugins) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    resolved: dict[str, Any] = {}
    for kind in _SECTIONS:
        choice = choices[kind]
        if (kind, choice.name) in (("trainer", NO_TRAINER), ("adapter", NO_ADAPTER)):
            resolved[kind] = None
            continue
        try:
            component = plugins.get(kind, choice.name)
        except UnknownComponentError as exc:
            problems.append(str(exc))
            continue
        try:
            resolved[kind] = ResolvedComponent(component, component.make_config(choice.options))
        except ConfigError as exc:
            problems.extend(f"[{kind}] {choice.name}: {p}" for p in exc.problems)
    return resolved, problems


def resolve(config: RunConfig, plugins) -> ResolvedRun:
    """Look up every component and validate its options; all problems in one error."""
    resolved, problems = _resolve_components({kind: getattr(config, kind) for kind in _SECTIONS}, plugins)
    if problems:
        raise ConfigError(problems, where="run configuration")
    return ResolvedRun(config, resolved["dataset"], resolved["trainer"], resolved["quantizer"], resolved["adapter"])

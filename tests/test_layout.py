"""The house rules a newcomer relies on, checked: where things live and who may import what.

* every module of ``plugins/`` sits in a folder that says what it is;
* no module imports a private name (``_x``) from another ``ftq_plugins`` module,
  and quantizers import no sibling quantizer (what they share is in ``quantizers/base.py``
  and ``quantizers/options.py``);
* the int8 scale floor and range are defined once (``ftq_plugins/int8/numerics.py``);
* the example third-party plugin uses only ``ftq_core.api`` from ftq.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"
FOLDERS = {"adapters", "codecs", "data", "datasets", "exporters", "fused", "int8", "qat", "quantizers", "trainers", "transforms"}
QUANTIZER_MODULES = {"dynamic", "static", "qat", "qat_int8"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(absolute module, imported names)`` for every ``from X import ...`` in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = "ftq_plugins." + ".".join(path.relative_to(PLUGINS).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names]))
    return found


def test_plugin_modules_live_in_folders_by_kind():
    loose = [p.name for p in PLUGINS.glob("*.py") if p.name != "__init__.py"]
    assert not loose, f"modules directly in plugins/: {loose}; put each in the folder of its kind"
    folders = {p.name for p in PLUGINS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == FOLDERS
    for folder in FOLDERS - {"data"}:
        init = PLUGINS / folder / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"{folder}/ says what it holds"


def test_every_plugin_folder_is_a_package_the_wheel_ships():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib

    declared = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = sorted(f"ftq_plugins.{folder}" for folder in FOLDERS if f"ftq_plugins.{folder}" not in declared)
    assert not missing, f"pyproject.toml's packages lack {missing}: a non-editable install would not have them"


def test_no_private_names_cross_plugin_modules_and_quantizers_import_no_sibling():
    problems = []
    for path in PLUGINS.rglob("*.py"):
        here = "ftq_plugins." + ".".join(path.relative_to(PLUGINS).with_suffix("").parts)
        for module, names in _imports(path):
            if not module.startswith("ftq_plugins") or module == here:
                continue
            private = [n for n in names if n.startswith("_")]
            if private:
                problems.append(f"{here} imports private {private} from {module}")
            if path.parent.name == "quantizers" and module.removeprefix("ftq_plugins.quantizers.") in QUANTIZER_MODULES:
                problems.append(f"{here} imports the quantizer module {module}")
    assert not problems, problems


def test_int8_range_and_scale_floor_are_defined_once():
    definitions = []
    for path in PLUGINS.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\b1e-(8|12)\b", code) or re.match(r"\s*INT8_MAX\s*=", code):
                definitions.append(f"{path.relative_to(REPO)}:{number}")
    assert definitions == ["plugins/int8/numerics.py:31", "plugins/int8/numerics.py:35"], definitions


def test_example_plugin_uses_only_the_public_api():
    source = REPO / "examples" / "ftq-weight-only" / "src"
    used = set()
    for path in source.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                used.add(node.module if node.module != "ftq_core" else "ftq_core." + node.names[0].name)
            elif isinstance(node, ast.Import):
                used.update(alias.name for alias in node.names)
    assert {m for m in used if m.startswith(("ftq_core", "ftq_plugins"))} == {"ftq_core.api"}

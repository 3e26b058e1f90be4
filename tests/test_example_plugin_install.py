"""The example third-party package, installed for real with `ftq install` and driven through the CLI.

A throw-away virtual environment is layered over the test environment (a
``.pth`` file makes torch, transformers and ftq importable) so installing and
uninstalling the example touches nothing else.  Offline: no index, no build
isolation, no dependencies to fetch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "ftq-weight-only"
TINY_RUN = [
    "--max-steps", "2", "--set", "dataset.block_size=32", "--set", "trainer.batch_size=2",
    "--set", "trainer.progress=false", "--set", "eval.max_blocks=2", "--set", "eval.prefill_tokens=16",
    "--set", "eval.decode_tokens=4", "--set", "eval.repeats=1",
]


class Env:
    """A virtual environment over the test one, and a way to run ``ftq`` in it."""

    def __init__(self, root: Path):
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        self.python = str(root / "bin" / "python")
        purelib = subprocess.run(
            [self.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        self.site_packages = Path(purelib)
        parent = sysconfig.get_paths()["purelib"]  # addsitedir also runs the parent's .pth files (editable ftq)
        (self.site_packages / "_ftq_test_parent.pth").write_text(f"import site; site.addsitedir({parent!r})\n")

    def ftq(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in ("FTQ_LOAD_PLUGINS", "FTQ_DISABLE_PLUGINS")}
        base.update(PIP_NO_INDEX="1", PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1", NO_COLOR="1")
        return subprocess.run(
            [self.python, "-m", "ftq_core.cli", *args], capture_output=True, text=True,
            env={**base, **(env or {})}, timeout=300,
        )


def plugin_names(done: subprocess.CompletedProcess) -> set[str]:
    assert done.returncode == 0, done.stderr
    return {info["name"] for info in json.loads(done.stdout)}


def _tests_conftest():
    """This directory's conftest (by path: the example package's tests have a conftest too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ftq_tests_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example installed with `ftq install` into a fresh environment; a tiny model directory beside it."""
    root = tmp_path_factory.mktemp("plugin-env")
    env = Env(root / "venv")
    done = env.ftq("install", "--no-build-isolation", "--no-deps", str(EXAMPLE))
    assert done.returncode == 0, done.stdout + done.stderr

    helpers = _tests_conftest()
    tokenizer = helpers.make_tiny_tokenizer()
    helpers.make_tiny_llama(len(tokenizer)).save_pretrained(root / "tiny-llama")
    tokenizer.save_pretrained(root / "tiny-llama")
    return env, done, root


def test_install_reports_what_the_plugin_registered(installed):
    env, done, _ = installed
    assert "Installed plugins:" in done.stdout
    assert "weight-only — quantizer, loaded" in done.stdout
    assert "quantizer: int8-weight-only — int8 per-channel weights" in done.stdout
    assert "from: entry point ftq_weight_only of ftq-weight-only 0.1.0" in done.stdout
    assert "module codecs: ftq-weight-only.int8_linear" in done.stdout


def test_plugins_lists_the_entry_point(installed):
    env, _, _ = installed
    done = env.ftq("plugins", "--json")
    (info,) = json.loads(done.stdout)
    assert info["name"] == "weight-only" and info["source"] == "entry point" and info["status"] == "loaded"
    assert info["distribution"] == "ftq-weight-only" and info["version"] == "0.1.0"
    assert info["components"] == {"quantizer": ["int8-weight-only"]} and info["api_version"] == 1
    assert Path(info["location"]).is_relative_to(env.site_packages)


def test_run_chain_with_the_plugin_then_eval_the_artifact(installed):
    env, _, root = installed
    out = root / "out"
    done = env.ftq("run", "--model", str(root / "tiny-llama"), "--quantizer", "int8-weight-only", "-o", str(out), *TINY_RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    # a third-party quantizer's row names its package
    assert "| int8 int8-weight-only (ftq-weight-only 0.1.0) |" in done.stdout and "| fp32 fine-tuned |" in done.stdout
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["method"] == "int8-weight-only"
    codecs = {entry["codec"] for entry in manifest["modules"].values()}
    assert codecs == {"ftq-weight-only.int8_linear"} and len(manifest["modules"]) == 14
    report = json.loads((out / "report.json").read_text())
    assert report["quantizer"]["options"]["compute_dtype"] == "bfloat16"

    done = env.ftq("eval", str(out / "model"), "--no-latency")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| int8-weight-only |" in done.stdout

    # Without the plugin, its artifact cannot be rebuilt: a clear error, not a traceback.
    done = env.ftq("eval", str(out / "model"), "--no-latency", env={"FTQ_LOAD_PLUGINS": ""})
    assert done.returncode == 1
    assert "saved by codec 'ftq-weight-only.int8_linear', which no loaded plugin provides" in done.stderr


def test_load_switches_hide_and_select_the_plugin(installed):
    env, _, root = installed
    assert plugin_names(env.ftq("plugins", "--json", env={"FTQ_LOAD_PLUGINS": ""})) == set()
    assert plugin_names(env.ftq("plugins", "--json", env={"FTQ_LOAD_PLUGINS": "ftq-weight-only"})) == {"weight-only"}
    (info,) = json.loads(env.ftq("--disable-plugin", "weight-only", "plugins", "--json").stdout)
    assert info["status"] == "disabled"
    done = env.ftq("--disable-plugin", "weight-only", "run", "--model", str(root / "tiny-llama"), "--quantizer", "int8-weight-only")
    assert done.returncode == 2
    assert "unknown quantizer 'int8-weight-only'" in done.stderr


def test_uninstall_removes_it(installed):
    env, _, _ = installed
    done = env.ftq("uninstall", "-y", "ftq-weight-only")
    assert done.returncode == 0, done.stderr
    assert "Removed plugin weight-only (ftq-weight-only 0.1.0)." in done.stdout
    assert plugin_names(env.ftq("plugins", "--json")) == set()

"""The README's Python examples run as written (guards the docs against API drift)."""
import os
import re

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


def test_quick_start_runs(tmp_path, monkeypatch):
    block = next(b for b in _python_blocks() if "BMojoConfig(\n" in b and "generate(" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md (quick start)", "exec"), scope)
    assert scope["out"].shape == (2, 150)
    assert (tmp_path / "my-bmojo" / "model.safetensors").is_file()


def test_preset_example_builds(monkeypatch):
    block = next(b for b in _python_blocks() if "checkpoints/bmojo-370m" in b)
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    with torch.device("meta"):  # the architecture, without allocating 370M parameters
        exec(compile(block, "README.md (presets)", "exec"), scope)
    assert scope["model"].config.model_type == "bmojo"


def test_ci_runs_the_readme_test_command():
    """.ci/run is the README's test command, verbatim; it tests both ends of every dependency range."""
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    command = re.search(r"# 2\. tests.*\n(.*)\n", readme).group(1)
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        assert command in fh.read().splitlines()
    assert "--upgrade-strategy eager" in command and "tests/oldest_deps.py" in command


def test_every_dependency_has_a_tested_lower_bound():
    import importlib.util

    spec = importlib.util.spec_from_file_location("oldest_deps", os.path.join(ROOT, "tests", "oldest_deps.py"))
    oldest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oldest)
    pins = oldest.lower_bounds(os.path.join(ROOT, "pyproject.toml"))
    names = {p.split("==")[0] for p in pins}
    assert {"torch", "transformers", "safetensors", "triton"} <= names
    assert all("==" in p for p in pins)

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

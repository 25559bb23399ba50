"""The op layer's layout: ``bmojo.ops`` holds the op API and the naive oracles (``bmojo.ops.reference``), the
implementations live in ``bmojo.backends.<name>``; an oracle shares no code with what it checks (a bug in
shared code could not be caught), and the oracles are what ``bmojo.ops`` exports as ``*_ref``."""
from __future__ import annotations

import ast
import pathlib

import torch

import bmojo.backends
import bmojo.ops as ops
from bmojo.ops import reference

OPS_DIR = pathlib.Path(ops.__file__).parent
BACKENDS_DIR = pathlib.Path(bmojo.backends.__file__).parent
ORACLE_IMPORTS = {"__future__", "math", "torch", "torch.nn.functional"}


def test_ops_holds_only_the_api_the_registry_and_the_oracles():
    files = sorted(str(p.relative_to(OPS_DIR)) for p in OPS_DIR.rglob("*.py"))
    oracles = sorted(f"reference/{op}.py" for op in ("attention", "causal_conv1d", "innovation", "selective_scan",
                                                      "ssd_scan"))
    assert files == sorted(["__init__.py", "registry.py", "reference/__init__.py", *oracles])


def test_each_oracle_is_self_contained():
    """An oracle module imports torch (and math) only: not another oracle, not bmojo, not a backend."""
    for path in (OPS_DIR / "reference").glob("*.py"):
        if path.name == "__init__.py":
            continue
        extra = {m for m in ast.walk(ast.parse(path.read_text())) if isinstance(m, (ast.Import, ast.ImportFrom))}
        names = set()
        for node in extra:
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path.name}: relative import"
            names.update([node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])
        assert names <= ORACLE_IMPORTS, f"{path.name} imports {names - ORACLE_IMPORTS}"


def test_no_backend_imports_an_oracle():
    for path in BACKENDS_DIR.rglob("*.py"):
        src = path.read_text()
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert "reference" not in node.module and "naive" not in node.module, f"{path}: {node.module}"
                assert not any(a.name.endswith("_ref") for a in node.names), f"{path}: imports an oracle"
            if isinstance(node, ast.Import):
                assert not any("reference" in a.name for a in node.names), f"{path}: imports an oracle"


def test_ops_reexports_the_oracles():
    for name in ("selective_scan_ref", "selective_state_update_ref", "causal_conv1d_ref", "causal_conv1d_update_ref",
                 "bmojo_attention_ref", "bmojo_attention_weights_ref", "attention_decode_ref",
                 "attention_decode_weights_ref", "innovation_select_ref", "innovation_scores_ref", "bmojo_visibility_masks",
                 "ssd_scan_ref", "ssd_state_update_ref"):
        assert getattr(ops, name) is getattr(reference, name), name
        assert name in ops.__all__, name
    # the API's functions are functions, not shadowed by subpackages of the same name
    for name in ("selective_scan", "causal_conv1d", "bmojo_attention", "attention_decode", "innovation_select",
                 "ssd_scan", "ssd_state_update"):
        assert callable(getattr(ops, name)) and getattr(ops, name).__module__ == "bmojo.ops", name


def test_oracle_selection_ranks_ties_to_the_earlier_position():
    eps = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.5, 0.5, 0.5, 0.5]])
    pos, valid = reference.select_from_scores_ref(eps, window=3, slots=2)
    # chunk 2 sees positions <= 3, chunk 1 position 0, chunk 0 nothing
    assert pos.tolist() == [[[0, 0], [0, 0], [1, 2]]]
    assert valid.tolist() == [[[False, False], [True, False], [True, True]]]

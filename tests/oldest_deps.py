"""Run the generation, decoding, interop and loading tests against the oldest releases bmojo admits.

Every dependency range in pyproject.toml has a lower bound; this script installs each dependency at
exactly that bound (torch aside: it stays the pinned CPU build of the README's commands, 2.13.0) into
a separate virtual environment, ``.venv-oldest``, installs bmojo there without its dependencies, and
runs the tests that depend most on transformers' behaviour. The newest end is the main test run, which
installs the newest releases explicitly (``pip install --upgrade --upgrade-strategy eager``).

    python tests/oldest_deps.py            # create or reuse .venv-oldest, then test
    python tests/oldest_deps.py --fresh    # recreate it first
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv-oldest")
TORCH_PIN = "torch==2.13.0"  # the CPU build the README's commands install; not downloaded again
TESTS = [
    "tests/test_hf_conformance.py", "tests/test_decoding.py", "tests/test_inputs.py", "tests/test_interop.py",
    "tests/test_loading.py", "tests/test_save_load.py", "tests/test_generation_options.py", "tests/test_config.py",
    "tests/test_compile.py",  # generate() with compile_config / a static cache
    "tests/backends/cuda",  # the Triton kernels through the interpreter, at triton's lower bound
]


def lower_bounds(pyproject: str) -> list[str]:
    """``name==lower`` for every dependency and test extra of pyproject.toml (torch: TORCH_PIN)."""
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    pins = []
    for req in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]
        if name == "torch":
            pins.append(TORCH_PIN)
            continue
        low = re.search(r">=\s*([\w.]+)", req)
        if low is None:
            raise SystemExit(f"pyproject.toml: {req!r} has no lower bound (>=), so its oldest end cannot be tested")
        pins.append(f"{name}=={low.group(1)}")
    return pins


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="recreate .venv-oldest")
    args = parser.parse_args()
    pins = lower_bounds(os.path.join(ROOT, "pyproject.toml"))
    if args.fresh and os.path.isdir(VENV):
        shutil.rmtree(VENV)
    if not os.path.isdir(VENV):
        venv.create(VENV, with_pip=True)
    python = os.path.join(VENV, "bin", "python")
    run([python, "-m", "pip", "install", "--quiet", *pins])
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "-e", "."])
    run([python, "-c", "import importlib.metadata as m; print('oldest end:', ', '.join(f'{p}=={m.version(p)}' "
                       f"for p in {[p.split('==')[0] for p in pins]!r}))"])
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())

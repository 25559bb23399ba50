#!/usr/bin/env bash
# Lazy-XLA graph check of a tiny bmojo model: no recompiles after the first step of each shape and no
# device-to-host syncs. Not part of the default CI (it downloads torch 2.9.0 + torch-xla 2.9.0, a few
# hundred MB). Runs on CPU through PJRT_DEVICE=CPU; on a Trainium host run check_xla.py in the
# torch-neuronx environment instead (PJRT_DEVICE=NEURON).
#
#   backends/neuron/check_xla.sh            # venv in ${BMOJO_XLA_VENV:-~/.cache/bmojo-xla-venv}
#   PYTHON=python3.11 backends/neuron/check_xla.sh
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${BMOJO_XLA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/bmojo-xla-venv}"
PY="${PYTHON:-python3}"
# torch from PyPI by default (its Linux wheel pulls in the CUDA libraries, ~3 GB); point TORCH_INDEX_URL at
# https://download.pytorch.org/whl/cpu for the ~200 MB CPU build where that index is reachable
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ -n "$TORCH_INDEX_URL" ]; then
    "$VENV/bin/python" -m pip install -q "torch==2.9.0" --index-url "$TORCH_INDEX_URL"
else
    "$VENV/bin/python" -m pip install -q "torch==2.9.0"
fi
"$VENV/bin/python" -m pip install -q "torch-xla==2.9.0"
"$VENV/bin/python" -m pip install -q -e "$REPO"   # bmojo and its dependencies (torch is already satisfied)
"$VENV/bin/python" -c "import torch, torch_xla; print('torch', torch.__version__, 'torch_xla', torch_xla.__version__)"

cd "$REPO"
PJRT_DEVICE="${PJRT_DEVICE:-CPU}" "$VENV/bin/python" "$HERE/check_xla.py" "$@"

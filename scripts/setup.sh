#!/usr/bin/env bash
# Create .venv with the CPU build of torch and this package (editable) with its test, eval and docs extras.
# Offline-friendly: torch 2.13.0's CPU wheel is taken from the local disk where present;
# a bare `torch` requirement would pull a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install "torch==2.13.0"
pip install -e ".[test,eval,docs]"
.venv/bin/python -c "import torch, mergekit_moe2dense, mergekit_moe2dense_hook; print('torch', torch.__version__, '| mergekit-moe2dense ready')"

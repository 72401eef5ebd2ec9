#!/usr/bin/env bash
# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
#
# Downloads, into .whl/ (git-ignored), the wheels that a GPU machine with no network needs for
# benchmarks/gpu_check.sh: the packages this project needs that the lent H200's image lacks
# (/work/.library/device/KINDS.md: it has torch, transformers, accelerate, peft, safetensors,
# scipy, scikit-learn, ... but not mergekit or pydantic), plus transformers itself, at
# the versions of this machine's .venv (the ones the tests ran with), built for the GPU
# machine's Python. Run it here, where pip reaches PyPI; gpu_check.sh installs .whl/ there.
#
#   bash benchmarks/gpu_wheels.sh                       # for the H200's Python 3.12
#   bash benchmarks/gpu_wheels.sh --python-version 3.11
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION=3.12
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) PYTHON_VERSION=$2; shift 2 ;;
        *) echo "gpu_wheels.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -x .venv/bin/python ] || { echo "gpu_wheels.sh: no .venv: run scripts/setup.sh first" >&2; exit 1; }

# What the image lacks of mergekit's and this package's needs, and transformers at the tested
# version. Not datasets: the check reads text files, and a datasets that the image's pyarrow or
# fsspec cannot import would break transformers' Trainer, which imports it wherever it is found.
NEEDED="mergekit immutables pydantic pydantic-core annotated-types typing-inspection transformers"
PINS=$(.venv/bin/python - $NEEDED << 'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
for name in sys.argv[1:]:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"gpu_wheels.sh: {name} is not installed in .venv: run scripts/setup.sh")
EOF
)
rm -rf .whl && mkdir -p .whl
# shellcheck disable=SC2086  # one argument per pin
.venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl $PINS 2> >(grep -v "^WARNING: Location" >&2)
echo "gpu_wheels.sh: $(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/ for Python $PYTHON_VERSION:" >&2
ls .whl >&2

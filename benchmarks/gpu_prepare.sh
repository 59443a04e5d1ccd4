#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a lent GPU machine, which reaches no package registry and takes
# 64 MiB of files a call: the default model's GGUF in two parts (98 MB) and the wheels that machine's image
# lacks (bitsandbytes for PEFT's QLoRA, gguf for reading the model), in .gpu/ (ignored by git). docs/gpu.md
# gives the three calls that carry them over and run the check.
#   bash benchmarks/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
mkdir -p .gpu/p1 .gpu/p2 .gpu/wheels
PY=${PYTHON:-.venv/bin/python}
gguf_file=$("$PY" -c 'from lorakit.models import default_gguf_path; print(default_gguf_path())')
rm -f .gpu/p1/* .gpu/p2/*
split -b 50000000 -d -a 2 "$gguf_file" /tmp/smollm2.gguf.part-
mv /tmp/smollm2.gguf.part-00 .gpu/p1/
mv /tmp/smollm2.gguf.part-01 .gpu/p2/
# the GPU machine's python is 3.12 (see the device tool's KINDS.md)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .gpu/wheels "bitsandbytes==0.50.2" "gguf==0.19.0"
du -sh .gpu/p1 .gpu/p2 .gpu/wheels

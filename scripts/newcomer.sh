#!/usr/bin/env bash
# The README's first command as a newcomer runs it, shortened: a fresh .venv without test extras, an empty model
# cache (so the GGUF file is dequantized and cached again) and a short training run. CI runs this before the
# tests, so a runtime dependency that only the test extras pull in fails here.
#   bash scripts/newcomer.sh          # uses ./.venv; refuses if one exists (it must start clean)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -e .venv ]; then
  echo "newcomer.sh: .venv exists; run it on a fresh clone (or remove .venv) so the set-up starts clean" >&2
  exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export LORAKIT_CACHE="$work/cache"
bash scripts/setup.sh
# No test extra may be present, or it could hide a missing runtime dependency.
for extra in peft pytest bitsandbytes; do
  if .venv/bin/python -c "import $extra" 2>/dev/null; then
    echo "newcomer.sh: '$extra' is installed without the test extras; the check would prove nothing" >&2
    exit 1
  fi
done
.venv/bin/lorakit train --train.steps 2 --train.batch_size 2 --data.n_train 16 --data.n_eval 4 \
  --eval.limit 2 --eval.max_new_tokens 4 --train.out_dir "$work/run" | tee "$work/train.log"
grep -q "^after:" "$work/train.log"
test -f "$work/run/adapter/adapter_model.safetensors"
test -n "$(ls "$LORAKIT_CACHE")"  # the GGUF was converted into the empty cache
echo "newcomer.sh: the README's first command works in a clean environment"

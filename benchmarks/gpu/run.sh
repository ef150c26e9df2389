#!/usr/bin/env bash
# Issue 13 item 8: every GPU check in ONE device call, its figures in $OUT (8 files at most come back).
#
#   here, first:      bash benchmarks/gpu/prepare.sh          # wheels + SmolLM2 tokenizer -> benchmarks/gpu/carry
#   on the GPU:       bash benchmarks/gpu/run.sh              # device run: carry=["benchmarks/gpu/carry"],
#                                                              #   timeout_s >= TOTAL + 60 (default TOTAL 500 s)
#   here, no GPU:     bash benchmarks/gpu/run.sh --dry-run    # the same steps on CPU, tiny models and budgets
#
# Steps, each under its own `timeout` and skipped when the time left (TOTAL) is under its budget, so the
# whole script ends inside one device call and what ran comes back: install the carried wheels offline;
# nvidia-smi and versions; pytest -m gpu; build random-initialised models with from_config (SmolLM2-135M's
# shape with its tokenizer, and a ~1.1B Llama-3.2-1B-shaped one: hidden 2048, 16 layers, 32/8 heads,
# MLP 8192, SmolLM2's 49,152-token vocabulary); then benchmarks/throughput.py (lora_sweep vs Trainer vs a
# bare loop, interleaved) on SmolLM2 (padded, then packed) and on the 1B in bf16 and in 4-bit.
# Random weights train at the speed of real ones (the same shapes and FLOPs): no 540 MB download to carry.
# Throughput figures name what they are: the GPU, dtype, steps, rounds (summary.txt, the .json files).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
DRY=0
[[ "${1:-}" == --dry-run ]] && DRY=1
CARRY=benchmarks/gpu/carry
OUT=${OUT:-$(mktemp -d /tmp/lora_sweep-gpu-out-XXXX)}
WORK=$(mktemp -d /tmp/lora_sweep-gpu-XXXX)
SUMMARY=$OUT/summary.txt
LOG=$OUT/steps.log
TOTAL=${TOTAL:-500}
# the keys of items 1-2 (model.dtype, model.quantization): set BF16=/Q4= to other overrides (space-separated)
# if they are named otherwise when merged, or to nothing (BF16= Q4=) on a checkout that lacks them
read -r -a BF16 <<<"${BF16-model.dtype=bf16}"
read -r -a Q4 <<<"${Q4-model.quantization=4bit}"
PEAK_TFLOPS=${PEAK_TFLOPS:-989}   # H100/H200 SXM dense bf16, datasheet; the measured ceiling here is ~790
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 LORA_SWEEP_CACHE=$WORK/cache
if ((DRY)); then
  PY=${PYTHON:-python}
  SCALE=${SCALE:-4}   # a shared CPU runs even the tiny steps slower than the GPU runs the real ones
  DEVICE=cpu
  BENCH=(--steps 2 --warmup 1 --repeats 1 --batch-size 4 --max-length 32)
  SMOL_LAYERS=2 BIG=(64 2 4 2 128)   # hidden, layers, heads, kv heads, MLP
  TESTS=(tests/test_train.py tests/test_causal.py)
else
  PY=${PYTHON:-python3}
  SCALE=${SCALE:-1}
  DEVICE=cuda
  BENCH=(--steps 40 --warmup 8 --repeats 2)
  SMOL_LAYERS=0 BIG=(2048 16 32 8 8192)
  TESTS=(tests)
fi
: > "$SUMMARY"
started=$SECONDS

step() {  # step NAME BUDGET_SECONDS COMMAND...: runs it under timeout, logs it, one summary line
  local name=$1 budget=$(($2 * SCALE)) t0=$SECONDS rc
  shift 2
  local left=$((TOTAL * SCALE - (SECONDS - started)))
  if ((left < budget)); then
    echo "$name: skipped (${left} s left, budget ${budget} s)" | tee -a "$SUMMARY"
    return 99
  fi
  echo "== $name (budget ${budget} s): $*" >>"$LOG"
  timeout -k 10 "$budget" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s$( ((rc == 124)) && echo ' (timed out)')" | tee -a "$SUMMARY"
  return $rc
}

if ((DRY)); then
  export PYTHONPATH=$REPO
else
  step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$CARRY"/wheels/*.whl
  export PYTHONPATH=$REPO:$WORK/site:$REPO/$CARRY/bnb
fi

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'PY'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "bf16", torch.cuda.is_bf16_supported())
for n in ("transformers", "peft", "optuna", "hydra-core", "mlflow", "bitsandbytes", "nvidia-ml-py", "accelerate"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "MISSING")
PY
} >"$OUT/env.txt" 2>&1
head -c 4000 "$OUT/env.txt" | grep -E "^(python|gpu|NVIDIA-SMI)|MISSING" | tee -a "$SUMMARY"

# gpu-marked tests (they skip without CUDA); -rs lists what skipped and why
step tests 120 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider "${TESTS[@]}"
cp "$LOG" "$OUT/tests.txt"

step models 60 "$PY" - "$CARRY/smollm2" "$WORK" "$SMOL_LAYERS" "${BIG[@]}" <<'PY'
import shutil, sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

tokenizer_dir, work, smol_layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
hidden, layers, heads, kv_heads, mlp = map(int, sys.argv[4:9])
base = AutoConfig.from_pretrained(tokenizer_dir)
shapes = {
    "smollm2": {"num_hidden_layers": smol_layers or base.num_hidden_layers},
    "llama1b": dict(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=mlp, head_dim=hidden // heads,
    ),
}
for name, changes in shapes.items():
    config = AutoConfig.from_pretrained(tokenizer_dir, **changes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = work / name
    model.save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        if file.name != "config.json" and file.is_file():
            shutil.copy(file, folder)
    print(name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ->", folder)
PY
grep -E "^(smollm2|llama1b) " "$LOG" | tee -a "$SUMMARY"

bench() {  # bench NAME BUDGET ARGS...: one throughput comparison, its table into the summary
  local name=$1 budget=$2
  shift 2
  step "$name" "$budget" "$PY" benchmarks/throughput.py --device "$DEVICE" --peak-tflops "$PEAK_TFLOPS" \
    --json "$OUT/$name.json" "${BENCH[@]}" "$@"
  local rc=$?
  # the table throughput.py prints last: from its header line to the ratio lines
  awk -v n="== $name " 'index($0, n) == 1 {on = 1; next} /^== / {on = 0} on' "$LOG" |
    sed -n '/ timed steps after /,$p' >>"$SUMMARY"
  return $rc
}
bench smollm2 110 --model smollm2 --model-path "$WORK/smollm2" "${BF16[@]}"
bench smollm2_packed 70 --model smollm2 --model-path "$WORK/smollm2" --packing --repeats 1 "${BF16[@]}"
bench llama1b_bf16 80 --model smollm2 --model-path "$WORK/llama1b" --repeats 1 "${BF16[@]}"
bench llama1b_4bit 80 --model smollm2 --model-path "$WORK/llama1b" --repeats 1 "${Q4[@]}"

echo "total $((SECONDS - started)) s of $TOTAL; figures in $OUT" | tee -a "$SUMMARY"

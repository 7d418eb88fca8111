#!/usr/bin/env bash
# All GPU checks in one go, for a lent CUDA machine (`make gpu-check`), most important first, each skipped when
# the time left (BUDGET_S, default 480 s from the start) is below what it needs:
#   1. bf16 + compile steps of GPT-2 124M, BERT-base, T5-base: tokens/s, MFU, peak memory (issue 8's targets)
#   2. the same shapes under FSDP2 wrapped on one device through torchrun --nproc_per_node=1, compiled
#      (--reshard-after-forward false: what FSDP's hooks cost; plain parallel=fsdp on one device is the plain
#      model of step 1, `fsdp_wraps`)
#   3. the same shapes with activation checkpointing: measured peak memory beside the estimate
#   4. the CUDA tests (-m gpu: tests/gpu, the memory estimate against max_memory_allocated, FLOPs, inference)
#   5. the matmul peak by probe size, data and length (scripts/profiling/matmul_peak.py: the MFU denominator)
#   6. where BERT-base's compiled step goes (scripts/profiling/profile_gpu.py)
#   7. the host-side cost of FSDP on one device (scripts/profiling/fsdp_overhead.py)
#   8. FSDP eager, then document-aware attention (block masks)
# Needs the wheels the machine lacks in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime; carry .whl). Writes
# one log (gpu_check.log) and the JSON under $OUT (default gpu_out/): the device tool returns at most 8 files.
# SKIP="tests docs ..." skips steps by name. GPU_PY: the Python (python3).
# Stops at once without a CUDA device; exits 1 when any step failed or timed out.
set -uo pipefail
OUT=${OUT:-gpu_out}
BUDGET_S=${BUDGET_S:-480}
SKIP=${SKIP:-}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"  # one log: the device tool returns at most 8 files from $OUT (this log + 5 JSON)
START=$(date +%s)
PY=${GPU_PY:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # llmtrain is not installed on a lent machine
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
if ! "$PY" -c "import hydra, omegaconf, llmtrain.config"; then
  echo "error: hydra-core, omegaconf or antlr4-python3-runtime missing for $PY: put their wheels in .whl/ (carry it)" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: scripts/gpu_check.sh needs a CUDA device and torch with CUDA ($PY: torch.cuda.is_available() is not True)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
"$PY" -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"
SHAPES="gpt2_124m bert_base t5_base"
BENCH="scripts/bench.py --precisions bf16 --steps 8 --warmup 2 --shapes $SHAPES"
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc_per_node=1"

step() {  # step NAME SECONDS COMMAND...: run it with that timeout if the budget allows
  local name=$1 need=$2
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [[ " $SKIP " == *" $name "* ]]; then echo "== $name: skipped (SKIP)" | tee -a "$LOG"; return; fi
  if ((left < need)); then echo "== $name: skipped, ${left}s left of BUDGET_S=$BUDGET_S (needs ${need}s)" | tee -a "$LOG"; return; fi
  echo "== $name (timeout ${need}s, ${left}s left)" | tee -a "$LOG"
  timeout "$need" "$@" 2>&1 | grep --line-buffered -v INFO | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if ((rc != 0)); then echo "== $name: FAILED (exit $rc; 124: timed out)" | tee -a "$LOG"; FAILED="$FAILED $name"; fi
}
FAILED=""

FSDP="--parallel fsdp --reshard-after-forward false"  # wrapped on one device (else the plain model)
GPU_TESTS="tests/gpu tests/unit/test_measure_memory.py tests/unit/test_measure_flops.py tests/integration/test_inference_gpu.py"
step single 240 "$PY" $BENCH --compile --json "$OUT/single_compile.json"
step fsdp 240 $TORCHRUN $BENCH $FSDP --compile --json "$OUT/fsdp_compile.json"
step ac 120 "$PY" scripts/bench.py --precisions bf16 --steps 3 --warmup 1 --shapes $SHAPES --activation-checkpointing --json "$OUT/ac.json"
step tests 180 "$PY" -m pytest -q -s -m gpu $GPU_TESTS -p no:cacheprovider
step peak 60 "$PY" scripts/profiling/matmul_peak.py
step profile_bert 120 "$PY" scripts/profiling/profile_gpu.py --shapes bert_base --compile
step overhead 90 $TORCHRUN scripts/profiling/fsdp_overhead.py
step fsdp_eager 150 $TORCHRUN $BENCH $FSDP --json "$OUT/fsdp_eager.json"
step docs 240 "$PY" $BENCH --compile --document-attention 512 --json "$OUT/single_compile_documents.json"
echo "== done in $(($(date +%s) - START))s${FAILED:+; failed:$FAILED}" | tee -a "$LOG"
[[ -z $FAILED ]]

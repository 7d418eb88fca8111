#!/usr/bin/env bash
# All GPU checks in one go, for a lent CUDA machine: CUDA tests, then bf16 + compile benchmarks (MFU, memory).
# Needs the wheels that machine lacks in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime). Writes to $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
timeout 150 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 300 python3 scripts/bench.py --shapes gpt2_124m bert_base t5_base --precisions bf16 --compile --steps 10 --warmup 3 --json "$OUT/bench_compile.json" 2>&1 | grep -v INFO | tee "$OUT/bench.log"
timeout 120 python3 scripts/bench.py --shapes gpt2_124m --precisions bf16 --steps 10 --warmup 3 --json "$OUT/bench_eager.json" 2>&1 | grep -v INFO | tee -a "$OUT/bench.log"
timeout 150 python3 scripts/bench.py --shapes gpt2_124m --precisions bf16 --compile --parallel fsdp --steps 10 --warmup 3 --json "$OUT/bench_fsdp.json" 2>&1 | grep -v INFO | tee -a "$OUT/bench.log"

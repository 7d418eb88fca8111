#!/usr/bin/env bash
# All GPU checks in one go, for a lent CUDA machine (`make gpu-check`): the CUDA tests, then bf16 steps of the
# three families under parallel=fsdp through torchrun --nproc_per_node=1, compile off and on, printing tokens/s,
# MFU and peak memory; then the single-device figures to compare. Needs the wheels the machine lacks in .whl/
# (hydra-core, omegaconf, antlr4-python3-runtime). Writes logs and JSON under $OUT (default gpu_out/).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
SHAPES="gpt2_124m bert_base t5_base"
RUN1="python3 -m torch.distributed.run --standalone --nproc_per_node=1 scripts/bench.py --precisions bf16 --steps 8 --warmup 2"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 150 python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
fi
timeout 200 $RUN1 --parallel fsdp --shapes $SHAPES --json "$OUT/fsdp_eager.json" 2>&1 | grep -v INFO | tee "$OUT/bench.log"
timeout 300 $RUN1 --parallel fsdp --compile --shapes $SHAPES --json "$OUT/fsdp_compile.json" 2>&1 | grep -v INFO | tee -a "$OUT/bench.log"
if [ "${SKIP_SINGLE:-0}" != 1 ]; then
  timeout 300 python3 scripts/bench.py --precisions bf16 --steps 8 --warmup 2 --compile --shapes $SHAPES --json "$OUT/single_compile.json" 2>&1 | grep -v INFO | tee -a "$OUT/bench.log"
fi
if [ "${SKIP_DOCS:-0}" != 1 ]; then  # document-aware attention: boolean block masks (documents of 512 tokens)
  timeout 300 python3 scripts/bench.py --precisions bf16 --steps 8 --warmup 2 --compile --document-attention 512 --shapes $SHAPES --json "$OUT/single_compile_documents.json" 2>&1 | grep -v INFO | tee -a "$OUT/bench.log"
fi
# the host-side cost of FSDP2 on one device (plain model against FSDP with auto and forced resharding)
timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node=1 scripts/profiling/fsdp_overhead.py 2>&1 | grep -v INFO | tee -a "$OUT/bench.log"

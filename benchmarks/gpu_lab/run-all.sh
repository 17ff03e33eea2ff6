#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-01 ~08:30 lease (one H200): X-LoRA non-granular with its real pass compiled
# by vLLM (XLoraRealPass) under CUDA graphs, beside its peers (the base with CUDA graphs,
# granular with CUDA graphs) in one run; then its GPU parity against peft (bf16, 5 x 32);
# then the one-GPU tests without ISQ, if the lease has time left. The 04:08 lease measured
# non-granular at 0.65x the base with the real pass captured uncompiled. Results in
# /tmp/results.
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/decode
export PYTHONUNBUFFERED=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
p "decode rows"
timeout 560 python3 -m benchmarks.gpu_decode --rows xlora --out $R/decode \
  --only "base (CUDA graphs),X-LoRA non-granular (CUDA graphs; as served),X-LoRA granular (CUDA graphs; as served)" \
  > $R/decode/log 2>&1
p "decode rows rc=$?"
p "parity non-granular cuda graphs"
timeout 300 python3 -m ruvllm.adapters.xlora.parity --xlora "$(ruvllm xlora-fixture 2>/dev/null | tail -1)" \
  --base "$(python3 -c 'from ruvllm.model_store import prepare_builtin; print(prepare_builtin("smollm2-135m-instruct"))')" \
  --prompts 5 --tokens 32 --dtype bfloat16 --cuda-graphs --non-granular \
  --out $R/xlora-parity-non-granular-cuda-graphs.json > $R/parity.log 2>&1
p "parity rc=$?"
p "gpu tests (no isq)"
export RUVLLM_GPU_RESULTS=$R/tests; mkdir -p $R/tests
timeout 700 python3 -m pytest tests/gpu tests/test_vllm_compat.py -v -rs -p no:cacheprovider \
  --durations=0 -k "not isq" > $R/tests/gpu-tests.log 2>&1
p "gpu tests rc=$?"
p "ALL DONE"

#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease.
# The 2026-12-01 21:5x lease (one H200): where W4A16's batch-1 decode step goes against
# bf16 (benchmarks.gpu_decode_profile: torch profiler, kernels by kind, bandwidth), then
# X-LoRA parity with peft scoring in one forward pass. Its first tries, the 14:42 and 15:31
# leases, lost the machine to client outages (14:42 after the bf16 row, whose W4A16 rows
# had failed for want of compressed-tensors); the 21:48 lease profiled all three rows, then
# lost the machine to one during the one-GPU tests (the five serving tests had passed).
cd /tmp/work
START=$(date +%s)
R=/tmp/results
export PYTHONUNBUFFERED=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
# vLLM loads a GPTQ checkpoint through compressed-tensors, which /tmp/site lacks (as in
# isq-env.sh; here its wheels come in x0, without the ISQ wheelhouse).
python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site-isq \
  /tmp/extra/compressed_tensors-0.17.0-py3-none-any.whl /tmp/extra/loguru-0.7.3-py3-none-any.whl
export PYTHONPATH=$PYTHONPATH:/tmp/site-isq
mkdir -p $R/profile $R/parity; p profile
timeout 600 python3 -m benchmarks.gpu_decode_profile --out $R/profile \
  --rows bf16,w4a16-marlin,w4a16-machete > $R/profile/log 2>&1
p "profile rc=$?"
# X-LoRA parity with peft's one-pass scoring, granular and non-granular under CUDA graphs:
# the GPU test's own command (tests/gpu/test_gpu_serving.py), without its Serve app.
X=$(python3 -c "from ruvllm.adapters.xlora.fixture import build_fixture; from ruvllm.model_store import prepare_builtin as b; print(build_fixture(b('smollm2-135m-instruct')))")
B=$(python3 -c "from ruvllm.model_store import prepare_builtin as b; print(b('smollm2-135m-instruct'))")
for mode in granular non-granular; do
  p "parity $mode"
  timeout 400 python3 -m ruvllm.adapters.xlora.parity --xlora "$X" --base "$B" --prompts 5 \
    --tokens 32 --dtype bfloat16 --cuda-graphs $([ $mode = non-granular ] && echo --non-granular) \
    --out $R/parity/xlora-parity-gpu-$mode-cuda-graphs.json > $R/parity/$mode.log 2>&1
  p "parity $mode rc=$?"
done
p "ALL DONE"

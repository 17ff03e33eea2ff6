#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease (2 x
# H200), ordered so that what shares Ray or a GPU's timing runs one after the other and the
# rest side by side. Results in /tmp/results, progress lines in /tmp/results/progress.
#   1. GPU 1: the one-GPU tests (tests/gpu, vllm_compat) on this tree, and beside them the
#      ISQ rows that tune GPTQ (asymmetric grid, dampening) with their RTN peer.
#      GPU 0 meanwhile: bare vLLM's OpenAI server, alone on its card and without Ray
#      (benchmark a's peer, c = 1 ... 256).
#   2. Once the tests have released Ray: the stack in Ray Serve's high-throughput mode with
#      one replica (GPU 0) and then two (both GPUs), Server-Timing probes beside the load
#      (benchmarks a and d in one report, bare kept from step 1).
#   3. The two-GPU test, if the lease has time left.
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/a $R/isq $R/tests
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
(while true; do echo "== $(date +%T)"; top -b -n1 -w 220 -c | sed -n 7,20p | cut -c1-200
   nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; sleep 4; done) > $R/top.log 2>&1 &
OUT=$R/isq . benchmarks/gpu_lab/isq-env.sh >> $R/progress 2>&1 || p "isq-env FAILED"
p "isq env ready; building the 8B model"
python3 - >> $R/progress 2>&1 <<'PY'
from pathlib import Path
from benchmarks.gpu_stack_vs_vllm import build_random_llama
from ruvllm.model_store import prepare_builtin
print("bf16", build_random_llama(Path("/tmp/llama8b-random"), prepare_builtin("smollm2-135m-instruct")))
PY
p "model built"
(
  CUDA_VISIBLE_DEVICES=0 timeout 480 python3 -m benchmarks.gpu_stack_vs_vllm --targets bare \
    --concurrency 1,16,64,128,256 --probe --out $R/a > $R/a/log-bare 2>&1
  p "a bare rc=$?"
) &
BARE=$!
(
  # Each scheme its own invocation: each merges into report.json, so a cut-off run keeps the rest.
  for s in rtn-w4a16-g64-asym gptq-w4a16-g64-asym gptq-w4a16-g64-damp0.1; do
    [ -f /tmp/stop-side ] && break
    CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m benchmarks.isq_bench --skip-speed --only $s \
      --out $R/isq >> $R/isq/log 2>&1
    p "isq $s rc=$?"
  done
  p "isq side track done"
) &
SIDE=$!
CUDA_VISIBLE_DEVICES=1 RUVLLM_GPU_RESULTS=$R/tests timeout 540 python3 -m pytest tests/gpu \
  tests/test_vllm_compat.py -v -rs -p no:cacheprovider --durations=0 \
  > $R/tests/gpu-tests.log 2>&1
p "tests done rc=$?"
ray stop --force > /dev/null 2>&1
wait $BARE
touch /tmp/stop-side; wait $SIDE
python3 -m benchmarks.gpu_stack_vs_vllm --targets stack-tput,stack-2-tput --keep \
  --concurrency 1,16,64,128,256 --concurrency-of stack-2-tput=128,256 --probe --out $R/a \
  > $R/a/log 2>&1
p "a+d done rc=$?"
ray stop --force > /dev/null 2>&1
RUVLLM_GPU_RESULTS=$R/tests timeout 200 python3 -m pytest tests/gpu/test_two_gpus.py -v -rs \
  -p no:cacheprovider --durations=0 > $R/tests/two-gpus.log 2>&1
p "two-gpu test rc=$?"
p "ALL DONE"

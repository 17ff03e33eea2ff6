#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease (2 x
# H200). Results in /tmp/results, progress lines in /tmp/results/progress.
# The 2026-12-01 lease: benchmark a with bare vLLM alone on the machine (the 11-30 21:17
# lease ran it beside the GPU tests, which slowed its TTFT), then the stack targets one
# after the other in one invocation, each kept in report.json as it finishes:
#   stack-tput-i4    one engine replica (GPU 0) behind four ingress replicas: c=128 was
#                    0.91x with one ingress, whose one Python process relays every stream;
#   stack-2-tput-i4  two engine replicas on two GPUs behind four ingresses (benchmark d,
#                    without one ingress's CPU as the ceiling);
#   stack-2-tput, stack-tput  the same with one ingress (the shipped GPU default).
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/a
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
(while true; do echo "== $(date +%T)"; top -b -n1 -w 220 -c | sed -n 7,20p | cut -c1-200
   nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; sleep 4; done) > $R/top.log 2>&1 &
p "building the 8B model"
python3 - >> $R/progress 2>&1 <<'PY'
from pathlib import Path
from benchmarks.gpu_stack_vs_vllm import build_random_llama
from ruvllm.model_store import prepare_builtin
print("bf16", build_random_llama(Path("/tmp/llama8b-random"), prepare_builtin("smollm2-135m-instruct")))
PY
p "model built"
CUDA_VISIBLE_DEVICES=0 timeout 480 python3 -m benchmarks.gpu_stack_vs_vllm --targets bare \
  --concurrency 1,16,64,128,256 --probe --out $R/a > $R/a/log-bare 2>&1
p "a bare rc=$?"
python3 -m benchmarks.gpu_stack_vs_vllm --keep \
  --targets stack-tput-i4,stack-2-tput-i4,stack-2-tput,stack-tput \
  --concurrency 1,16,64,128,256 --concurrency-of stack-2-tput-i4=128,256 \
  --concurrency-of stack-2-tput=128,256 --concurrency-of stack-tput=1,64,128 \
  --probe --out $R/a > $R/a/log 2>&1
p "a+d done rc=$?"
ray stop --force > /dev/null 2>&1
p "ALL DONE"

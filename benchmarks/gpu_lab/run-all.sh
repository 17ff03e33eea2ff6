#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease (2 x
# H200), ordered so that what shares Ray or a GPU's timing runs one after the other and the
# rest side by side. Results in /tmp/results, progress lines in /tmp/results/progress.
#   1. Both GPUs: the GPU tests (tests/gpu, vllm_compat) on this tree, first, because they
#      decide what the benchmarks mean (X-LoRA's parity under CUDA graphs).
#      GPU 1 meanwhile and after: the ISQ schemes that lack an out-of-distribution figure,
#      GPTQ W4 g64 three times from scratch (the spread on a GPU), then the X-LoRA decode rows.
#   2. GPU 0: benchmark a, bare vLLM vs the stack (high-throughput mode) at c=1, 64 and 128,
#      with Server-Timing probes beside the load (where the stack's TTFT goes).
#   3. Both GPUs, once GPU 1 is free: benchmark d, one replica vs two at c=128.
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/a $R/x $R/d $R/isq $R/tests
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
  # One scheme per invocation: each merges into report.json, so a cut-off run keeps the rest.
  for s in gptq-w8a16-g64 gptq-w4a16-g64-no-actorder rtn-w8a8 rtn-w8a16-g64 rtn-w4a16-g64-mixed16; do
    [ -f /tmp/stop-side ] && break
    CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m benchmarks.isq_bench --skip-speed --only $s \
      --out $R/isq >> $R/isq/log 2>&1
    p "isq $s rc=$?"
  done
  [ -f /tmp/stop-side ] || { CUDA_VISIBLE_DEVICES=1 timeout 420 python3 -m benchmarks.isq_bench --skip-speed \
      --only gptq-w4a16-g64 --repeat 3 --out $R/isq >> $R/isq/log 2>&1; p "isq gptq repeat 3 rc=$?"; }
  [ -f /tmp/stop-side ] || { CUDA_VISIBLE_DEVICES=1 timeout 420 python3 -m benchmarks.gpu_decode --rows xlora \
      --out $R/x > $R/x/log 2>&1; p "x (X-LoRA decode rows) rc=$?"; }
  p "side track done"
) &
SIDE=$!
RUVLLM_GPU_RESULTS=$R/tests timeout 600 python3 -m pytest tests/gpu tests/test_vllm_compat.py -v -rs \
  -p no:cacheprovider --durations=0 > $R/tests/gpu-tests.log 2>&1
p "tests done rc=$?"
ray stop --force > /dev/null 2>&1
CUDA_VISIBLE_DEVICES=0 timeout 660 python3 -m benchmarks.gpu_stack_vs_vllm --targets bare,stack-tput \
  --concurrency 1,64,128 --probe --out $R/a > $R/a/log 2>&1
p "a done rc=$?"
ray stop --force > /dev/null 2>&1
touch /tmp/stop-side; wait $SIDE
python3 -m benchmarks.gpu_stack_vs_vllm --targets stack-tput,stack-2-tput \
  --peer stack-tput --concurrency 128 --probe --out $R/d > $R/d/log 2>&1
p "d done rc=$?"
p "ALL DONE"

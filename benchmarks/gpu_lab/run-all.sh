#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of one lease (2 x
# H200), ordered so that what shares Ray or a GPU's timing runs one after the other and the
# rest side by side. Results in /tmp/results, progress lines in /tmp/results/progress.
#   1. GPU 0: benchmark a, bare vLLM vs the stack (high-throughput mode) at c=1 and c=128,
#      with Server-Timing probes beside the load (where the stack's TTFT goes);
#      GPU 1 meanwhile: the decode rows with Machete disabled (so W4A16 runs on Marlin),
#      then every ISQ scheme of benchmarks/isq_bench.py with its out-of-distribution figure.
#   2. Both GPUs: the GPU tests (tests/gpu, vllm_compat) on this tree.
#   3. Both GPUs, once the ISQ rows are done: benchmark d, one replica vs two at c=128.
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/a $R/b $R/d $R/isq $R/tests
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
(while true; do echo "== $(date +%T)"; top -b -n1 -w 220 -c | sed -n 7,20p | cut -c1-200
   nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; sleep 4; done) > $R/top.log 2>&1 &
OUT=$R/isq . benchmarks/gpu_lab/isq-env.sh >> $R/progress 2>&1 || p "isq-env FAILED"
p "isq env ready; building models"
python3 - >> $R/progress 2>&1 <<'PY'
from pathlib import Path
from benchmarks.gpu_stack_vs_vllm import build_random_llama
from benchmarks.gpu_decode import build_random_gptq
from ruvllm.model_store import prepare_builtin
base = prepare_builtin("smollm2-135m-instruct")
m = Path("/tmp/llama8b-random")
print("bf16", build_random_llama(m, base))
print("gptq", build_random_gptq(Path("/tmp/llama8b-random-gptq"), m))
PY
p "models built"
(
  CUDA_VISIBLE_DEVICES=1 VLLM_DISABLED_KERNELS=MacheteLinearKernel timeout 480 \
    python3 -m benchmarks.gpu_decode --rows quant --out $R/b > $R/b/log 2>&1
  p "b (decode rows, Marlin) done rc=$?"
  # One scheme per invocation: each merges into report.json, so a cut-off run keeps the rest.
  for s in rtn-w4a16-g64 gptq-w4a16-g64 awq-w4a16-g64 gptq-w4a16-g32 rtn-w4a16-g64-mixed8 \
           gptq-w4a16-g64-mixed8 awq-w4a16-g64-mixed8 fp8-w8a8 smoothquant-w8a8 gptq-w8a8 rtn-w8a8 \
           rtn-w8a16-g64 gptq-w8a16-g64 rtn-w4a16-g64-mixed16 gptq-w4a16-g64-no-actorder; do
    [ -f /tmp/stop-isq ] && break
    CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m benchmarks.isq_bench --skip-speed --only $s \
      --out $R/isq >> $R/isq/log 2>&1
    p "isq $s rc=$?"
  done
  p "isq rows done"
) &
SIDE=$!
CUDA_VISIBLE_DEVICES=0 timeout 720 python3 -m benchmarks.gpu_stack_vs_vllm --targets bare,stack-tput \
  --concurrency 1,128 --probe --out $R/a > $R/a/log 2>&1
p "a done rc=$?"
ray stop --force > /dev/null 2>&1
RUVLLM_GPU_RESULTS=$R/tests timeout 600 python3 -m pytest tests/gpu tests/test_vllm_compat.py -v -rs \
  -p no:cacheprovider --durations=0 > $R/tests/gpu-tests.log 2>&1
p "tests done rc=$?"
ray stop --force > /dev/null 2>&1
touch /tmp/stop-isq; wait $SIDE
python3 -m benchmarks.gpu_stack_vs_vllm --targets stack-tput,stack-2-tput,stack-2-tput-i4 \
  --peer stack-tput --concurrency 128 --probe --out $R/d > $R/d/log 2>&1
p "d done rc=$?"
p "ALL DONE"

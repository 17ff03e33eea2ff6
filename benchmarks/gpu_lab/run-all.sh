#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of this lease, one
# after the other where they share Ray, side by side where they don't. Results in /tmp/results.
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/a $R/b $R/d $R/i
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
p() { echo "$(date +%T) $*" >> $R/progress; }
(while true; do echo "== $(date +%T)"; top -b -n1 -w 220 -c | sed -n 7,20p | cut -c1-200
   nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; sleep 4; done) > $R/top.log 2>&1 &
p "building models"
python3 - >> $R/progress 2>&1 <<'PY'
from pathlib import Path
from benchmarks.gpu_stack_vs_vllm import build_random_llama
from benchmarks.gpu_decode import build_random_gptq
from ruvllm.model_store import prepare_builtin
m = Path("/tmp/llama8b-random")
print("bf16", build_random_llama(m, prepare_builtin("smollm2-135m-instruct")))
print("gptq", build_random_gptq(Path("/tmp/llama8b-random-gptq"), m))
PY
p "models built; b+c on GPU1, a on GPU0"
CUDA_VISIBLE_DEVICES=1 python3 -m benchmarks.gpu_decode --out $R/b > $R/b/log 2>&1 &
DEC=$!
CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.gpu_stack_vs_vllm --targets bare,stack,stack-tput --out $R/a > $R/a/log 2>&1
p "a done rc=$?"
wait $DEC; p "b done rc=$?"
D=stack,stack-2
python3 -c "import json,sys; t=json.load(open('$R/a/report.json'))['targets']; sys.exit(0 if t.get('stack-tput',{}).get('rows',{}).get('128',{}).get('completed',0) else 1)" && D=stack-tput,stack-2-tput
p "d: $D"
python3 -m benchmarks.gpu_stack_vs_vllm --targets $D --peer ${D%%,*} --concurrency 128 --out $R/d > $R/d/log 2>&1
p "d done rc=$?"
# ISQ on the GPU (tests/gpu/test_isq_gpu.py through the helper script), then, if time is
# left, the four-ingress targets.
mkdir -p $R/isq
p "isq start"
(export OUT=$R/isq; . .gpu/isq0/run-isq.sh) > $R/isq/run.log 2>&1
p "isq done rc=$?"
if [ $(( $(date +%s) - START )) -lt 900 ]; then
  CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.gpu_stack_vs_vllm --targets stack-i4,stack-tput-i4 --peer stack-i4 --concurrency 64,128 --out $R/i > $R/i/log 2>&1
  p "i done rc=$?"
fi
p "ALL DONE"

#!/bin/bash
# Device side, started with setsid after setup.sh: every GPU measurement of this lease, one
# after the other where they share Ray or a GPU, side by side where they don't. Results in
# /tmp/results, progress lines in /tmp/results/progress.
#   GPU 1: decode rows bf16 / FP8 / W4A16 on the 8B shape, then X-LoRA parity under CUDA graphs;
#   GPU 0 meanwhile: bare vLLM vs the stack behind four ingresses (high-throughput mode);
#   both GPUs: benchmark d, one replica vs two, each behind four ingresses, c=128.
cd /tmp/work
START=$(date +%s)
R=/tmp/results; mkdir -p $R/a $R/b $R/d $R/x
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
p() { echo "$(date +%T) +$(( $(date +%s) - START ))s $*" >> $R/progress; }
(while true; do echo "== $(date +%T)"; top -b -n1 -w 220 -c | sed -n 7,20p | cut -c1-200
   nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; sleep 4; done) > $R/top.log 2>&1 &
# vLLM imports compressed-tensors (0.26 pins 0.17.0, which needs loguru) to load FP8 and
# GPTQ checkpoints; the staged /tmp/site has neither. Serving-side copies behind /tmp/site.
python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site-isq \
  .gpu/isq0/serving/compressed_tensors-0.17.0-py3-none-any.whl .gpu/isq0/loguru-0.7.3-py3-none-any.whl \
  >> $R/progress 2>&1
export PYTHONPATH=$PYTHONPATH:/tmp/site-isq
p "building models"
python3 - >> $R/progress 2>&1 <<'PY'
from pathlib import Path
from benchmarks.gpu_stack_vs_vllm import build_random_llama
from benchmarks.gpu_decode import build_random_gptq
from ruvllm.adapters.xlora.fixture import build_fixture
from ruvllm.model_store import prepare_builtin
base = prepare_builtin("smollm2-135m-instruct")
m = Path("/tmp/llama8b-random")
print("bf16", build_random_llama(m, base))
print("gptq", build_random_gptq(Path("/tmp/llama8b-random-gptq"), m))
Path("/tmp/xlora-fixture").write_text(str(build_fixture(base)))
PY
p "models built"
(
  CUDA_VISIBLE_DEVICES=1 python3 -m benchmarks.gpu_decode --rows quant --out $R/b > $R/b/log 2>&1
  p "b (quant rows) done rc=$?"
  CUDA_VISIBLE_DEVICES=1 python3 -m ruvllm.adapters.xlora.parity --xlora $(cat /tmp/xlora-fixture) \
    --base $(python3 -c "from ruvllm.model_store import prepare_builtin as p; print(p('smollm2-135m-instruct'))") \
    --prompts 5 --tokens 32 --dtype bfloat16 --cuda-graphs --out $R/x/parity-graphs.json > $R/x/log 2>&1
  p "x (parity, CUDA graphs) done rc=$?"
) &
SIDE=$!
CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.gpu_stack_vs_vllm --targets bare,stack-tput-i4 \
  --concurrency 1,64,128 --out $R/a > $R/a/log 2>&1
p "a done rc=$?"
wait $SIDE
python3 -m benchmarks.gpu_stack_vs_vllm --targets stack-tput-i4,stack-2-tput-i4 --peer stack-tput-i4 \
  --concurrency 128 --out $R/d > $R/d/log 2>&1
p "d done rc=$?"
p "ALL DONE"
